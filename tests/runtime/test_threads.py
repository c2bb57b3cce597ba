import pytest

from amct_caffe import AmctError
from amct_caffe.runtime import num_threads, set_num_threads


def test_set_num_threads_limits_and_restores():
    before = num_threads()
    try:
        set_num_threads(1)
        assert num_threads() == 1
    finally:
        set_num_threads(None)
    assert num_threads() == before
    with pytest.raises(AmctError, match="positive integer"):
        set_num_threads(0)
