"""IFMR layers handing their fills to a worker (layers/calibration_overlap.py) against the same Net run
with every fill in the layer: the same record bytes, the record written when forward returns, the
same errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from amct_caffe.quant import QuantizationError
from amct_caffe.runtime import TEST, Net
from amct_caffe.runtime.layers import calibration

IFMR = ('layer {{ name: "{name}" type: "IFMR" bottom: "{bottom}" ifmr_param {{ batch_num: {batches} '
        'with_offset: true search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01 '
        'max_percentile: 0.999999 min_percentile: 0.999999 object_layer: "{target}" record_file_path: "{path}" }} }}\n')
SHAPE = (2, 3, 100, 120)  # 72000 values per batch: past the streaming observer's exact limit (histogram search)


def net_text(record, batches: int) -> str:
    """An input read by an IFMR layer (filled in place), then layers whose outputs are handed over."""
    return ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 100 '
            'dim: 120 } } }\n'
            + IFMR.format(name="data_ifmr", bottom="data", target="conv", path=record, batches=batches)
            + 'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 '
              'kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" '
              'value: 0.1 } } }\n'
            + 'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
            + IFMR.format(name="relu_ifmr", bottom="conv", target="pool", path=record, batches=batches)
            + 'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX '
              'kernel_size: 2 stride: 2 } }\n'
            + IFMR.format(name="pool_ifmr", bottom="pool", target="ip", path=record, batches=batches)
            + 'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 '
              'weight_filler { type: "gaussian" std: 0.01 } } }\n'
            + IFMR.format(name="ip_ifmr", bottom="ip", target="out", path=record, batches=batches))


def batches(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(SHAPE) * (1 + i) + 0.25).astype(np.float32) for i in range(n)]


def run(tmp_path, monkeypatch, spare: int, name: str, xs, n: int = 3, watch=None) -> bytes:
    monkeypatch.setattr(calibration, "spare_cores", lambda: spare)
    record = tmp_path / f"{name}.txt"
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(net_text(record, n))
    net = Net(str(proto), TEST, seed=3)
    for i, x in enumerate(xs):
        net.forward(data=x)
        if watch is not None:
            watch(i, record)
    return record.read_bytes()


def test_overlapped_fills_give_the_records_bytes(tmp_path, monkeypatch):
    xs = batches(3)
    threads_seen = set()
    real_update = calibration.IfmrStreamObserver.update

    def update(self, *arrays, threads=1):
        threads_seen.add(threading.current_thread().name.split("_")[0])
        return real_update(self, *arrays, threads=threads)

    monkeypatch.setattr(calibration.IfmrStreamObserver, "update", update)
    written = []
    inline = run(tmp_path, monkeypatch, 0, "inline", xs)
    assert threads_seen == {"MainThread"}
    overlapped = run(tmp_path, monkeypatch, 1, "overlap", xs,
                     watch=lambda i, rec: written.append(rec.exists()))
    assert "amct-ifmr" in threads_seen  # the fills of the layers after the input ran on the worker
    assert written == [False, False, True]  # the last forward returns with the record written
    assert overlapped.replace(b"overlap", b"inline") == inline
    assert b"conv" in inline and b"pool" in inline and b"scale_d" in inline


def test_an_input_is_filled_before_the_next_forward_rewrites_it(tmp_path, monkeypatch):
    """The next forward(data=...) writes the input blob in place: its layer may not leave it to the worker."""
    xs = batches(2, seed=1)
    inline = run(tmp_path, monkeypatch, 0, "inline", xs, n=2)
    overlapped = run(tmp_path, monkeypatch, 1, "overlap", xs, n=2)
    assert overlapped.replace(b"overlap", b"inline") == inline


@pytest.mark.parametrize("spare", [0, 1])
def test_an_inf_in_a_handed_over_batch_is_raised_by_its_forward(tmp_path, monkeypatch, spare):
    xs = batches(2, seed=2)
    monkeypatch.setattr(calibration, "spare_cores", lambda: spare)
    record = tmp_path / "record.txt"
    proto = tmp_path / "net.prototxt"
    proto.write_text(net_text(record, 2) + 'layer { name: "exp" type: "Exp" bottom: "ip" top: "exp" }\n'
                     + IFMR.format(name="exp_ifmr", bottom="exp", target="x", path=record, batches=2))
    net = Net(str(proto), TEST, seed=3)
    net.forward(data=xs[0])
    with np.errstate(over="ignore"), pytest.raises(QuantizationError,
                                                   match=r"layer 'exp_ifmr' \(IFMR\).*scale is illegal"):
        net.forward(data=xs[1] * np.float32(1e4))  # exp(ip) overflows to inf
    if spare:  # the drain settles and writes the layers before the failing one before raising
        assert all(name in record.read_bytes() for name in (b"conv", b"pool", b"ip"))


def test_a_forked_child_gets_a_worker_of_its_own(tmp_path, monkeypatch):
    """A child forked after the worker started inherits the pool but not its thread."""
    import multiprocessing
    from amct_caffe.runtime.layers import calibration_overlap

    assert calibration_overlap._worker().submit(lambda: 1).result() == 1  # the parent's worker runs
    xs = batches(2, seed=4)
    inline = run(tmp_path, monkeypatch, 0, "inline", xs, n=2)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        overlapped = pool.apply_async(_child_record, (str(tmp_path), xs)).get(timeout=120)
    assert overlapped.replace(b"child", b"inline") == inline


def _child_record(tmp: str, xs) -> bytes:
    from pathlib import Path

    calibration.spare_cores = lambda: 1
    record, proto = Path(tmp) / "child.txt", Path(tmp) / "child.prototxt"
    proto.write_text(net_text(record, 2))
    net = Net(str(proto), TEST, seed=3)
    for x in xs:
        net.forward(data=x)
    return record.read_bytes()
