"""Locating a real Caffe build for the opt-in integration tests.

``AMCT_REAL_CAFFE`` is the root made by ``../shared/tools/build_caffe.sh`` (it holds env.sh and
src/*/python), or directly a pycaffe package directory (one holding caffe/__init__.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def pycaffe_dir() -> Path | None:
    root = os.environ.get("AMCT_REAL_CAFFE")
    if not root:
        return None
    root = Path(root)
    if (root / "caffe" / "__init__.py").is_file():
        return root
    for cand in sorted(root.glob("src/*/python")):
        if (cand / "caffe" / "__init__.py").is_file():
            return cand
    raise RuntimeError(f"AMCT_REAL_CAFFE={root} holds no pycaffe (expected src/*/python/caffe or caffe/)")


def run_with_pycaffe(code: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a subprocess that can import both caffe and amct_caffe."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join([str(pycaffe_dir()), str(repo), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd or repo, capture_output=True, text=True,
                          timeout=timeout, check=False)
