"""Writing a set of output files all-or-nothing.

Each file is first written to a temporary name in its target directory; only when every one was
written are they renamed into place. A failure leaves no new or half-written output behind
(files from an earlier run stay as they were).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from amct_caffe.errors import FileAccessError
from amct_caffe.io.files import message_text, temp_file_beside, write_error
from amct_caffe.io.paths import check_distinct, check_output


class StagedOutputs:
    def __init__(self):
        self._files: list[tuple[Path, list]] = []  # (target, the buffers its bytes are, in order)

    def add_bytes(self, path, data: bytes) -> str:
        return self.add_chunks(path, [data])

    def add_chunks(self, path, chunks: list) -> str:
        """Stage a file whose bytes are the concatenation of ``chunks`` (bytes or memoryviews, which
        must not change before :meth:`commit`)."""
        self._files.append((check_output(path), chunks))
        return str(path)

    def add_text(self, path, text: str) -> str:
        return self.add_bytes(path, text.encode("utf-8"))

    def add_json(self, path, obj) -> str:
        return self.add_text(path, json.dumps(obj, indent=2) + "\n")

    def add_message_text(self, path, message) -> str:
        return self.add_text(path, message_text(message))

    def commit(self) -> None:
        """Write every file, or none: on any failure the targets are as they were before."""
        check_distinct(path for path, _ in self._files)
        for path, _ in self._files:
            if path.is_dir():
                raise FileAccessError(f"cannot write {path}: a directory of that name exists; choose another output "
                                      "path")
        staged: list[tuple[str, Path]] = []
        moved: list[tuple[Path, str | None]] = []  # (target, backup of its previous file or None)
        target = self._files[0][0] if self._files else Path()
        try:
            for path, chunks in self._files:
                target = path
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = temp_file_beside(path)
                staged.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
            for tmp, path in staged:
                target = path
                backup = f"{tmp}.previous" if path.exists() else None
                moved.append((path, backup))  # before the renames: an interrupt between them is undone too
                if backup is not None:
                    os.replace(path, backup)
                os.replace(tmp, path)
        except BaseException as e:  # an interrupt too: put back what was there, write nothing
            for path, backup in reversed(moved):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, path)
                    else:
                        os.unlink(path)
            if isinstance(e, OSError):
                raise FileAccessError(f"{write_error(target, e)}; no output file was changed") from e
            raise
        finally:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        for _, backup in moved:
            if backup is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(backup)
        self._files.clear()
