"""The whole PTQ flow on random networks (netgen's, LSTM and RNN included), with weights from their fillers.

For every net the executor builds, ``calibrate`` (every quantizable layer the default config
enables, two batches) either refuses with the library's own error or saves models that:

* run in the executor (fake-quant and deploy) on the calibration batch, with finite outputs;
* are what ``convert_model`` writes from the saved record, byte for byte (the record holds every
  factor, recurrent layers' included);
* are compared with the float model by the accuracy report without an error.

``AMCT_PTQ_NETS`` sets the number of nets (default 300; a few seconds per hundred).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from amct_caffe.api.compare import compare_batches
from amct_caffe.api.convert import convert_model
from amct_caffe.api.workflow import calibrate
from amct_caffe.errors import AmctError
from amct_caffe.io.record import read_record
from amct_caffe.runtime import Net
from tests.differential.netgen import generate

NETS = int(os.environ.get("AMCT_PTQ_NETS", "300"))
SEED = 5
SAVED = ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_model.prototxt",
         "deploy_weights.caffemodel", "quant_param_record.txt")


def _batches(net_inputs: dict, index: int) -> list[dict]:
    rng = np.random.default_rng(index)
    return [{k: v if k.startswith("cont") else (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
             for k, v in net_inputs.items()} for _ in range(2)]


def _run(prototxt, weights, feed: dict) -> None:
    net = Net(str(prototxt), str(weights), phase=1)
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    net.forward()
    for name in net.outputs:
        if not np.isfinite(net.blobs[name].data).all():
            assert _log_of_a_quantized_zero(net), f"{prototxt}: output {name} is not finite"


def _log_of_a_quantized_zero(net) -> bool:
    """Whether the first non-finite value of ``net`` is a Log of zero or less: the guide quantizes a Log's input,
    on a grid that holds 0 (offset_d), so an input within half a step of 0 reads 0, and with a shift of 0 or a
    small one its log is -inf or NaN, as on the SoC (net (5, 2319): inputs from 0.37 on a step of 3.6)."""
    for name, layer in zip(net._layer_names, net.layers, strict=True):  # noqa: SLF001
        tops = [net.blobs[t].data for t in net.top_names[name]]
        if all(np.isfinite(t).all() for t in tops):
            continue
        if layer.type != "Log":
            return False
        lp = layer.lp.log_param  # Caffe's Log: log_base(shift + scale * x)
        x = net.blobs[net.bottom_names[name][0]].data
        return bool((np.float32(lp.shift) + np.float32(lp.scale) * x <= 0).any())
    return False


def random_models(seed: int, count: int, tmp_path):
    """(index, netgen net, its folder, prototxt, caffemodel of its fillers' weights) of each of the first
    ``count`` nets of ``seed`` that the executor builds (a net Caffe refuses too, netgen's REFUSED kind, is
    skipped: the differential test covers those)."""
    for index in range(count):
        gen = generate(seed, index)
        work = tmp_path / str(index)
        work.mkdir()
        proto, weights = work / "m.prototxt", work / "m.caffemodel"
        proto.write_text(gen.prototxt)
        try:
            Net(str(proto), phase=1, seed=index).save(str(weights))
        except AmctError:
            continue
        yield index, gen, work, proto, weights


def test_ptq_on_random_networks(tmp_path):
    outcomes = {"saved": 0, "refused": 0, "nothing to quantize": 0, "recurrent": 0}
    for index, gen, work, proto, weights in random_models(SEED, NETS, tmp_path):
        batches = _batches(gen.inputs, index)
        where = f"net ({SEED}, {index}) focused on {gen.focus}"
        try:
            calibrate(str(proto), str(weights), batches, str(work / "q" / "m"), 2, progress=False)
        except AmctError:
            outcomes["refused"] += 1
            continue
        except Exception as e:  # pragma: no cover - what the test is for
            pytest.fail(f"{where}: calibrate raised {type(e).__name__}, not an AmctError: {e}")
        record = read_record(work / "q" / "m_quant_param_record.txt")
        if not record.layers:
            outcomes["nothing to quantize"] += 1
            continue
        outcomes["saved"] += 1
        outcomes["recurrent"] += any(e.scale_h is not None for e in record.layers.values())
        for model in ("fake_quant", "deploy"):
            _run(work / "q" / f"m_{model}_model.prototxt", work / "q" / f"m_{model}_weights.caffemodel", batches[0])
            # the accuracy report compares it (a detection list through the blobs it is computed from)
            _, summary, _ = compare_batches(str(proto), str(weights), str(work / "q" / f"m_{model}_model.prototxt"),
                                            str(work / "q" / f"m_{model}_weights.caffemodel"), batches)
            assert summary["blobs_compared"] > 0, where
        convert_model(str(proto), str(weights), str(work / "q" / "m_quant_param_record.txt"), str(work / "c" / "m"))
        for kind in SAVED:
            assert (work / "c" / f"m_{kind}").read_bytes() == (work / "q" / f"m_{kind}").read_bytes(), \
                f"{where}: convert_model's {kind} differs from save_model's"
    # the sweep means something only if most nets went through, recurrent ones among them
    assert outcomes["saved"] > NETS * 0.6, outcomes
    assert outcomes["recurrent"] >= NETS // 60, outcomes
