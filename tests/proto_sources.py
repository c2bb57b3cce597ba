"""The schema sources in proto/ and the caffe.proto the build generates from them.

The repository has no caffe.proto: the build merges amct_custom.proto into caffe_base.proto with
proto/gen_caffe_proto.py. Tests that mean "our caffe.proto" use :func:`generated_caffe_proto`, which runs
that same generator on the checkout's files.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

PROTO = Path(__file__).resolve().parents[1] / "proto"
BASE = PROTO / "caffe_base.proto"
AMCT = PROTO / "amct_custom.proto"
# What CMakeLists.txt compiles together with the generated caffe.proto into schema.desc.
COMPILED_WITH = [PROTO / "scale_offset_record.proto", PROTO / "calibration_config.proto",
                 PROTO / "retrain_config.proto"]


@lru_cache(maxsize=None)
def generator():
    """proto/gen_caffe_proto.py as a module (it is a build script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("gen_caffe_proto", PROTO / "gen_caffe_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def generated_caffe_proto() -> str:
    """The text of the caffe.proto the build compiles, made from the checkout's proto/ files."""
    return generator().generate(BASE, AMCT, COMPILED_WITH)
