#!/usr/bin/env python3
"""Install AMCT's layers into a Caffe source tree (user guide, 安装后处理 / patch安装).

    python3 install.py --caffe_dir CAFFE_DIR [--custom_proto CUSTOM_PROTO_FILE]

Merges caffe.proto, copies the layer sources and libquant, installs patches, moves stale protoc output
of caffe.proto to backups and patches the Makefile and CMakeLists.txt (see installer.py). Safe to run
again; on failure nothing is changed. It never writes Makefile.config (it says when one is missing).
Rebuild Caffe afterwards (``make clean && make all -j && make pycaffe -j``, or re-run cmake and make).
"""

# ruff: noqa: T201  (a command line tool: its output is the guide's [INFO] lines)
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `caffe_patch` importable as a package

from caffe_patch.installer import InstallError, PartialRollback, install  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Merge AMCT's caffe.proto definitions, layer sources and libquant into a Caffe tree.")
    parser.add_argument("--caffe_dir", required=True, metavar="CAFFE_DIR",
                        help="Required. Caffe source directory (relative or absolute path).")
    parser.add_argument("--custom_proto", metavar="CUSTOM_PROTO_FILE",
                        help="Optional. The user's custom.proto (relative or absolute path).")
    args = parser.parse_args(argv)
    try:
        from caffe_patch.merge_proto import MergeError  # noqa: PLC0415
    except ImportError as exc:
        print(f"[ERROR]caffe_patch/merge_proto is missing or broken: {exc}", file=sys.stderr)
        return 1
    try:
        install(args.caffe_dir, args.custom_proto, report=print)
    except (InstallError, MergeError, OSError, ValueError) as exc:
        for line in str(exc).splitlines():
            print(f"[ERROR]{line}", file=sys.stderr)
        if isinstance(exc, PartialRollback):
            print("[ERROR]Install failed, and the Caffe tree could not be fully restored (see above).", file=sys.stderr)
        else:
            print("[ERROR]Install failed; the Caffe tree is unchanged.", file=sys.stderr)
        return 1
    print("[INFO]Rebuild Caffe now: make clean && make all -j && make pycaffe -j "
          "(CMake: re-run cmake in the build directory, then make).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
