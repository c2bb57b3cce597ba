import logging
import os

import pytest


@pytest.fixture(autouse=True)
def _quiet_amct_logs(caplog):
    caplog.set_level(logging.WARNING, logger="amct_caffe")
    yield


def real_caffe_root():
    return os.environ.get("AMCT_REAL_CAFFE")


def pytest_collection_modifyitems(config, items):
    if real_caffe_root():
        return
    skip = pytest.mark.skip(reason="needs a real Caffe build: set AMCT_REAL_CAFFE to the root made by "
                                   "../shared/tools/build_caffe.sh (see README)")
    for item in items:
        if "real_caffe" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cli_scratch_dir(tmp_path, monkeypatch):
    """Run a command-line test in a scratch directory, and keep the CLI from attaching log handlers
    for the whole session (the test_cli* modules use it for every test)."""
    from amct_caffe import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.log, "setup", lambda *args, **kwargs: None)


@pytest.fixture
def simd_limit():
    """``simd_limit(level)`` caps every kernel's vector level for the test (2 AVX-512, 1 AVX2, 0 portable;
    amct/cpu.h), e.g. to compare a kernel's paths; the cap in force before (``AMCT_SIMD``) is back after it."""
    from amct_caffe import _kernels

    previous = _kernels.set_simd_limit(2)
    _kernels.set_simd_limit(previous)
    yield _kernels.set_simd_limit
    _kernels.set_simd_limit(previous)
