"""``python -m caffe_patch.merge_proto``: merge protos into one caffe.proto, without touching a Caffe tree."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from . import MergeError, default_amct_proto, merge_files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m caffe_patch.merge_proto",
        description="Merge a user's custom.proto with AMCT's amct_custom.proto, then the result into a Caffe "
                    "caffe.proto, following the user guide's proto-merge rules. A clash stops the merge with "
                    "an [ERROR] naming both definitions and the rule; nothing is written then.")
    p.add_argument("--caffe_proto", required=True, metavar="FILE",
                   help="the caffe.proto to merge into (usually CAFFE_DIR/src/caffe/proto/caffe.proto)")
    p.add_argument("--amct_proto", metavar="FILE",
                   help="AMCT's amct_custom.proto (default: the one shipped with caffe_patch)")
    p.add_argument("--custom_proto", metavar="FILE", help="optional: the user's custom.proto")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="where to write the merged caffe.proto (may be --caffe_proto itself)")
    return p


def _write_atomic(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:  # what open(path, "w") would give, not mkstemp's owner-only mode
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _say(line: str, err: bool = False):
    print(line, file=sys.stderr if err else sys.stdout)  # noqa: T201 - the command's output


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        amct = Path(args.amct_proto) if args.amct_proto else default_amct_proto()
        result = merge_files(args.caffe_proto, amct, args.custom_proto)
    except MergeError as e:
        for problem in e.problems:
            _say(f"[ERROR]{problem}", err=True)
        return 1
    for line in result.notices:
        _say(f"[WARNING]{line}")
    for line in result.added:
        _say(f"[INFO]Added {line}")
    out = Path(args.output)
    try:
        if out.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, result.text)
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        _say(f"[ERROR]cannot write {out}: {reason}; nothing was written", err=True)
        return 1
    _say(f"[INFO]Merge \"{Path(args.caffe_proto).name}\" success: wrote {out}"
         f"{'' if result.added else ' (nothing to add)'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
