"""Where a Net's calibration layers read and write the scale/offset record.

The IFMR and SearchN layers of one Net that name the same ``record_file_path`` share one
:class:`RecordSink`. Backed by the file (the guide's flow, for calibration models also run in
real Caffe), it parses the file once and writes it once per forward: parsing and printing
protobuf text in Python is slow (about a second for a ResNet's record), so the layers that
finish in the same forward update one record and the last of them writes it; the file is read
again only if something else changed it meanwhile. Backed by a :class:`~amct_caffe.io.record.Record`
given to the Net (the embedded flows), nothing touches the disk: the layers fill that record.
"""

from __future__ import annotations

import os
from pathlib import Path

from amct_caffe.io.record import Record, read_record, write_record


def _stamp(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class RecordSink:
    """The record behind ``path``: the file, or ``in_memory`` when given (then no file is used)."""

    def __init__(self, path: str, in_memory: Record | None = None):
        self.path = path
        self.in_memory = in_memory
        self._record = in_memory
        self._stamp = None

    def exists(self) -> bool:
        return self.in_memory is not None or Path(self.path).exists()

    def get(self) -> Record:
        """The current record (a new empty one if the file does not exist yet)."""
        if self.in_memory is not None:
            return self.in_memory
        if self._record is None or _stamp(self.path) != self._stamp:
            self._record = read_record(self.path) if Path(self.path).exists() else Record()
            self._stamp = _stamp(self.path)
        return self._record

    def write(self) -> None:
        """Write what the layers changed to the file (nothing for an in-memory record)."""
        if self.in_memory is not None or self._record is None:
            return
        write_record(self._record, self.path)
        self._stamp = _stamp(self.path)
