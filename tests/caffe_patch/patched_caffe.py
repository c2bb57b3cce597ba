"""A real Caffe tree with caffe_patch installed and built, for test_real_caffe_integration.py.

The source is the one ``../shared/tools/build_caffe.sh`` unpacked under ``AMCT_REAL_CAFFE``; the
configure flags are those of its build (read from its CMakeCache.txt). The patched tree lives in
a cache, ``$AMCT_PATCHED_CAFFE`` or ``~/.cache/amct-caffe/patched/<key>``, keyed by the source's
caffe.proto, the custom.proto, our amct_custom.proto and the *names* of caffe_patch's layer and patch
files. Each use re-runs install.py on the cached tree (which updates changed layer files and
patches) and then ``make``, so an unchanged tree costs seconds and an edited layer recompiles only
itself. A full build (about 4 minutes on 2 idle cores; every object depends on caffe.pb.h) happens
once per key; older keys are deleted. ``JOBS`` (default 2) sets ``make -j``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.real_caffe import pycaffe_dir
from tests.caffe_patch.guide_examples import GUIDE_CUSTOM_PROTO

REPO = Path(__file__).resolve().parents[2]
INSTALL_PY = REPO / "caffe_patch/install.py"
CACHE_FORMAT = "1"



def pristine_source() -> tuple[Path, Path]:
    """(Caffe source dir, its build_caffe.sh build dir) under AMCT_REAL_CAFFE."""
    src = pycaffe_dir().parent
    if not (src / "src/caffe/proto/caffe.proto").is_file():
        raise RuntimeError(f"{src} is not a Caffe source tree; AMCT_REAL_CAFFE must be a build_caffe.sh root")
    build = Path(os.environ["AMCT_REAL_CAFFE"]) / "build"
    if not (build / "CMakeCache.txt").is_file():
        raise RuntimeError(f"{build}/CMakeCache.txt not found; AMCT_REAL_CAFFE must be a build_caffe.sh root")
    return src, build


def configure_args(reference_build: Path, reference_src: Path, src: Path) -> list[str]:
    """cmake -D arguments of the reference build, with its source path replaced by ``src``."""
    cache = (reference_build / "CMakeCache.txt").read_text()
    args = []
    for name in ("CMAKE_BUILD_TYPE", "ANACONDA_HOME", "PYTHON_VERSION", "CPU_ONLY", "BUILD_python",
                 "BUILD_python_layer", "USE_LMDB", "CMAKE_CXX_FLAGS", "CMAKE_SHARED_LINKER_FLAGS"):
        m = re.search(rf"(?m)^{name}:[A-Z]+=(.*)$", cache)
        if m:
            args.append(f"-D{name}={m.group(1).replace(str(reference_src), str(src))}")
    return args


def run_install(caffe_dir: Path, custom_proto: Path | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(INSTALL_PY), "--caffe_dir", str(caffe_dir)]
    if custom_proto is not None:
        cmd += ["--custom_proto", str(custom_proto)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)


def _key(src: Path, custom_text: str) -> str:
    h = hashlib.sha256(CACHE_FORMAT.encode())
    h.update(str(src).encode())
    h.update((src / "src/caffe/proto/caffe.proto").read_bytes())
    h.update(custom_text.encode())
    # A new AMCT message is appended where an earlier merge put nothing, so re-installing over an
    # older patched tree would not give the same caffe.proto as a fresh install: start afresh.
    h.update((REPO / "proto" / "amct_custom.proto").read_bytes())
    for top in ("include", "src", "patch"):
        for p in sorted((REPO / "caffe_patch" / top).rglob("*")):
            h.update(str(p.relative_to(REPO)).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, check=False)
    if res.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"{cmd[0]} failed (log {log}):\n" + "\n".join(tail))


def patched_caffe(custom_text: str = GUIDE_CUSTOM_PROTO) -> Path:
    """The pycaffe directory (``.../python``) of the patched and built tree; builds or updates it."""
    pristine, reference_build = pristine_source()
    base = Path(os.environ.get("AMCT_PATCHED_CAFFE", Path.home() / ".cache/amct-caffe/patched"))
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time
        cache = base / _key(pristine, custom_text)
        for old in base.iterdir():  # earlier keys' trees (only directories this module made)
            if old != cache and re.fullmatch(r"[0-9a-f]{16}", old.name) and (old / "custom.proto").is_file():
                shutil.rmtree(old, ignore_errors=True)
        src, build, log = cache / "src", cache / "build", cache / "build.log"
        custom = cache / "custom.proto"
        if not src.is_dir():
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            shutil.copytree(pristine, cache / "src.tmp", symlinks=True)
            (cache / "src.tmp").rename(src)
        custom.write_text(custom_text)
        res = run_install(src, custom)
        if res.returncode != 0:
            raise RuntimeError(f"install.py failed on {src}:\n{res.stdout}\n{res.stderr}")
        args = configure_args(reference_build, pristine, src)
        if not (build / "Makefile").is_file():
            _run(["cmake", "-S", str(src), "-B", str(build), *args], log)
        else:  # re-glob (new layer files need a configure), with the reference's options (LMDB...)
            _run(["cmake", *args, str(build)], log)
        _run(["make", "-C", str(build), f"-j{os.environ.get('JOBS', '2')}"], log)
        return src / "python"
