import logging
import os

import pytest


@pytest.fixture(autouse=True)
def _quiet_amct_logs(caplog):
    caplog.set_level(logging.WARNING, logger="amct_caffe")
    yield


def real_caffe_root():
    return os.environ.get("AMCT_REAL_CAFFE")
