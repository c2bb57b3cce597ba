"""A real Caffe tree with caffe_patch installed and built by Caffe's own Makefile, for test_real_caffe_makefile.py.

What a user does after install.py (caffe_patch/README.md): a ``Makefile.config`` from
``Makefile.config.example`` (CPU-only, OpenBLAS, the Python of ``AMCT_REAL_CAFFE``'s venv with Debian's
Boost.Python), then ``make all pycaffe``. The source is the one ``build_caffe.sh`` unpacked (as in
patched_caffe.py) without the ``python/caffe/_caffe.so`` symlink its CMake build left there: make would
take that newer file as an up-to-date target and the tests would run the CMake-built module.

The tree is cached in ``$AMCT_MAKEFILE_CAFFE`` or ``~/.cache/amct-caffe/patched-make/<key>`` (its own
directory: patched_caffe.py deletes other keys' trees in its base), keyed like patched_caffe.py's
tree plus the Makefile.config and install.py's Makefile block (make does not notice changed link
flags, so a changed block starts from a fresh copy). Each use re-runs install.py and
``make all pycaffe``, so an unchanged tree costs seconds; a cold build takes about 6 minutes on 2
idle cores (14-18 under load). ``JOBS`` (default 2) sets ``make -j``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from caffe_patch.installer import MAKEFILE_BLOCK
from tests.caffe_patch.guide_examples import GUIDE_CUSTOM_PROTO
from tests.caffe_patch.patched_caffe import _key as cmake_tree_key
from tests.caffe_patch.patched_caffe import pristine_source, run_install

CACHE_FORMAT = "make-1"
MARKER = "custom.proto"  # every cache directory this module made holds one
CMAKE_PYCAFFE_LINK = Path("python/caffe/_caffe.so")


def _python_settings() -> tuple[list[str], str, str]:
    """(include dirs, library dir, 'X.Y') of the Python that pycaffe is built for (AMCT_REAL_CAFFE's venv)."""
    venv_python = Path(os.environ["AMCT_REAL_CAFFE"]) / "venv/bin/python"
    python = str(venv_python) if venv_python.is_file() else sys.executable
    code = ("import sysconfig, sys, numpy; print(sysconfig.get_paths()['include']); print(numpy.get_include()); "
            "print(sysconfig.get_config_var('LIBDIR')); print('%d.%d' % sys.version_info[:2])")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    return [out[0], out[1]], out[2], out[3]


def makefile_config(example: str) -> str:
    """``Makefile.config.example`` with the settings of build_caffe.sh's CMake build, appended (later wins)."""
    includes, libdir, version = _python_settings()
    hdf5_inc = [d for d in ("/usr/include/hdf5/serial",) if Path(d).is_dir()]
    hdf5_lib = [str(d) for d in sorted(Path("/usr/lib").glob("*/hdf5/serial"))]
    boost_python = f"boost_python{version.replace('.', '')}"
    return example.rstrip("\n") + f"""

# ---- amct_caffe tests (tests/caffe_patch/makefile_caffe.py): CPU only, OpenBLAS, Python {version}
CPU_ONLY := 1
USE_OPENCV := 0
USE_LEVELDB := 0
USE_LMDB := 0
BLAS := open
PYTHON_INCLUDE := {' '.join(includes)}
# Python 3 with Python layers: Debian's Boost.Python for this version, and libpython for the tools.
PYTHON_LIBRARIES := {boost_python} python{version}
PYTHON_LIB := {libdir}
WITH_PYTHON_LAYER := 1
INCLUDE_DIRS := $(PYTHON_INCLUDE) /usr/local/include {' '.join(hdf5_inc)}
LIBRARY_DIRS := $(PYTHON_LIB) /usr/local/lib /usr/lib {' '.join(hdf5_lib)}
"""


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> float:
    t0 = time.monotonic()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, check=False)
        seconds = time.monotonic() - t0
        out.write(f"# exit {res.returncode} after {seconds:.0f} s\n")
    if res.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"{cmd[0]} failed (log {log}):\n" + "\n".join(tail))
    return seconds


def library_dir(tree: Path) -> Path:
    """Where the Makefile put libcaffe.so (``.<BUILD_DIR>_release/lib``; brocolli-caffe forces BUILD_DIR = temp)."""
    found = sorted(tree.glob(".*_release/lib/libcaffe.so"))
    if not found:
        raise RuntimeError(f"no libcaffe.so under {tree}/.*_release/lib")
    return found[0].parent


def makefile_patched_caffe(custom_text: str = GUIDE_CUSTOM_PROTO) -> Path:
    """The patched Caffe source tree built with ``make all pycaffe``; builds or updates it (under a lock)."""
    pristine, _ = pristine_source()
    base = Path(os.environ.get("AMCT_MAKEFILE_CAFFE", Path.home() / ".cache/amct-caffe/patched-make"))
    base.mkdir(parents=True, exist_ok=True)
    config = makefile_config((pristine / "Makefile.config.example").read_text())
    h = hashlib.sha256(CACHE_FORMAT.encode())
    h.update(cmake_tree_key(pristine, custom_text).encode())
    h.update(config.encode())
    h.update(MAKEFILE_BLOCK.encode())  # make does not track link flags: a changed block needs a fresh build
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time
        cache = base / h.hexdigest()[:16]
        for old in base.iterdir():  # earlier keys' trees (only directories this module made)
            if old != cache and re.fullmatch(r"[0-9a-f]{16}", old.name) and (old / MARKER).is_file():
                shutil.rmtree(old, ignore_errors=True)
        src, log = cache / "src", cache / "build.log"
        if not src.is_dir():
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            link = pristine / CMAKE_PYCAFFE_LINK
            shutil.copytree(pristine, cache / "src.tmp", symlinks=True,
                            ignore=lambda d, names: [n for n in names if Path(d) / n == link])
            (cache / "src.tmp").rename(src)
        (cache / MARKER).write_text(custom_text)
        res = run_install(src, cache / MARKER)
        with open(log, "a") as out:
            out.write(f"$ install.py\n{res.stdout}{res.stderr}")
        if res.returncode != 0:
            raise RuntimeError(f"install.py failed on {src}:\n{res.stdout}\n{res.stderr}")
        cfg = src / "Makefile.config"
        if not cfg.is_file() or cfg.read_text() != config:  # our own tree: the shipped config is the sdist author's
            cfg.write_text(config)
        _run(["make", "-C", str(src), f"-j{os.environ.get('JOBS', '2')}", "all", "pycaffe"], log)
        return src
