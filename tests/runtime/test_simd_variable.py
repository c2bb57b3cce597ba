"""AMCT_SIMD: the cap on the vector kernels every C++ loop may use (csrc/include/amct/cpu.h), read once per
process, so it is checked in fresh interpreters."""

import os
import subprocess
import sys

import pytest

_kernels = pytest.importorskip("amct_caffe._kernels")

PROBE = ("import amct_caffe.runtime.layers.conv_plan as plan; from amct_caffe import _kernels; "
         "print(_kernels.simd_level(), _kernels.winograd_simd_level(), _kernels.ifmr_simd_level())")


def _levels(value: str | None) -> tuple[list[int], str]:
    env = {k: v for k, v in os.environ.items() if k != "AMCT_SIMD"}
    if value is not None:
        env["AMCT_SIMD"] = value
    res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [int(v) for v in res.stdout.split()], res.stderr


def test_the_variable_caps_every_kernel_and_unknown_values_are_ignored_with_a_warning(simd_limit):
    simd_limit(2)
    cpu = _kernels.simd_level()  # this CPU's own level (the test run's cap lifted)
    assert _levels("portable")[0][:2] == [0, 0]
    assert _levels("avx2")[0][:2] == [min(cpu, 1)] * 2
    assert _levels("avx512")[0][:2] == [cpu] * 2
    levels, stderr = _levels("sse4")
    assert levels[:2] == [cpu] * 2
    assert "AMCT_SIMD='sse4' is not one of avx512, avx2, portable" in stderr


def test_set_simd_limit_returns_the_cap_it_replaces_and_clamps(simd_limit):
    simd_limit(1)
    assert _kernels.set_simd_limit(7) == 1
    assert _kernels.set_simd_limit(-3) == 2
    assert _kernels.simd_level() == 0
