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

from google.protobuf import text_format

from amct_caffe.errors import AmctError
from amct_caffe.io.files import temp_file_beside


class StagedOutputs:
    def __init__(self):
        self._files: list[tuple[Path, bytes]] = []

    def add_bytes(self, path, data: bytes) -> str:
        self._files.append((Path(path), data))
        return str(path)

    def add_text(self, path, text: str) -> str:
        return self.add_bytes(path, text.encode("utf-8"))

    def add_json(self, path, obj) -> str:
        return self.add_text(path, json.dumps(obj, indent=2) + "\n")

    def add_message_text(self, path, message) -> str:
        return self.add_text(path, text_format.MessageToString(message))

    def commit(self) -> None:
        """Write every file, or none: on any failure the targets are as they were before."""
        for path, _ in self._files:
            if path.is_dir():
                raise AmctError(f"cannot write {path}: a directory of that name exists")
        staged: list[tuple[str, Path]] = []
        moved: list[tuple[Path, str | None]] = []  # (target, backup of its previous file or None)
        try:
            for path, data in self._files:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = temp_file_beside(path)
                staged.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            for tmp, path in staged:
                backup = None
                if path.exists():
                    backup = f"{tmp}.previous"
                    os.replace(path, backup)
                moved.append((path, backup))
                os.replace(tmp, path)
        except OSError as e:
            for path, backup in reversed(moved):  # put back what was there
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, path)
                    else:
                        os.unlink(path)
            raise AmctError(f"writing {e.filename or 'the outputs'} failed ({e.strerror or e}); "
                            "no output file was changed") from e
        finally:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        for _, backup in moved:
            if backup is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(backup)
        self._files.clear()
