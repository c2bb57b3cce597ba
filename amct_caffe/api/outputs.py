"""Writing a set of output files all-or-nothing.

Each file is first written to a temporary name in its target directory; only when every one was
written are they renamed into place. A failure leaves no new or half-written output behind
(files from an earlier run stay as they were).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from google.protobuf import text_format

from amct_caffe.io import net_to_caffemodel


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
        staged: list[tuple[str, Path]] = []
        try:
            for path, data in self._files:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                staged.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            for tmp, path in staged:
                os.replace(tmp, path)
        finally:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self._files.clear()


def write_model_files(outputs: StagedOutputs, net, weights, model_file, weights_file) -> None:
    """Stage a prototxt (no blobs) and a caffemodel (with ``weights``) for ``net``."""
    outputs.add_message_text(model_file, net)
    outputs.add_bytes(weights_file, net_to_caffemodel(net, weights).SerializeToString())
