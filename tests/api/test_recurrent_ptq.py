"""The guide's PTQ flow and convert_model on models holding LSTM and RNN layers (docs/recurrent.md).

The calibration model is run from its files by the executor, as a user's Caffe would run it; the
saved models are checked against the float model, against each other (deploy against fake-quant),
and against convert_model's from the saved record (the same bytes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe.api.accuracy import compare_model
from amct_caffe.api.workflow import calibrate
from amct_caffe.errors import AmctError
from amct_caffe.quant.arq import arq_quantize_weight
from amct_caffe.io.record import RecordError, read_record, write_record
from amct_caffe.io import load_weights
from amct_caffe.runtime import Net
from tests.api.flow import calibration_model

T, N, D, DS, H = 6, 4, 5, 3, 8
KINDS = ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_model.prototxt",
         "deploy_weights.caffemodel", "quant_param_record.txt")


def _model(tmp: Path, kind: str, static: bool) -> tuple[Path, Path]:
    reset = "linear_before_reset: 1" if kind == "GRU_after" else ""  # a GRU resetting after R_h's product
    static_input = f'layer {{ name: "s" type: "Input" top: "s" input_param {{ shape {{ dim: {N} dim: {DS} }} }} }}'
    text = f"""
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: {T} dim: {N} dim: {D} }} }} }}
layer {{ name: "cont" type: "Input" top: "cont" input_param {{ shape {{ dim: {T} dim: {N} }} }} }}
{static_input if static else ""}
layer {{ name: "rec" type: "{kind.split('_')[0]}" bottom: "x" bottom: "cont" {'bottom: "s"' if static else ""} top: "h"
  recurrent_param {{ num_output: {H} {reset} weight_filler {{ type: "uniform" min: -0.5 max: 0.5 }}
                     bias_filler {{ type: "uniform" min: -0.2 max: 0.2 }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "h" top: "y"
  inner_product_param {{ num_output: 4 axis: 2 weight_filler {{ type: "gaussian" std: 0.3 }}
                         bias_filler {{ type: "constant" value: 0.1 }} }} }}
"""
    proto, weights = tmp / "float.prototxt", tmp / "float.caffemodel"
    proto.write_text(text)
    Net(str(proto), phase=1, seed=3).save(str(weights))  # the fillers' weights
    return proto, weights


def _batch(rng, static: bool) -> dict[str, np.ndarray]:
    cont = np.ones((T, N), np.float32)
    cont[0] = 0
    cont[4, 2] = 0
    feed = {"x": rng.normal(0, 1, (T, N, D)).astype(np.float32), "cont": cont}
    if static:
        feed["s"] = rng.normal(0, 1, (N, DS)).astype(np.float32)
    return feed


def _forward(net: Net, feed: dict) -> np.ndarray:
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    net.forward()
    return net.blobs["y"].data.ravel().astype(np.float64)


def _arq_scale(weight) -> float:
    return float(arq_quantize_weight(weight, "InnerProduct", False, 8, backend="reference").scale[0])


def _cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module", params=[("LSTM", False), ("LSTM", True), ("RNN", False), ("RNN", True),
                                        ("GRU", False), ("GRU", True), ("GRU_after", False)],
                ids=lambda p: p[0] + ("-static" if p[1] else ""))
def flow(request, tmp_path_factory):
    kind, static = request.param
    tmp = tmp_path_factory.mktemp(f"{kind}{int(static)}")
    proto, weights = _model(tmp, kind, static)
    rng = np.random.default_rng(11)
    graph, mm, mw = calibration_model(tmp, proto, weights, batch_num=2)
    calib = Net(mm, mw, 1)
    assert calib.layer_dict["rec"].type == f"{kind.split('_')[0]}Calibration"
    for _ in range(2):
        _forward(calib, _batch(rng, static))
    amct.save_model(graph, "Both", str(tmp / "out" / "q"))
    return kind, static, tmp, proto, weights


def test_record_holds_every_factor_of_the_recurrent_layer(flow):
    kind, static, tmp, *_ = flow
    entry = read_record(tmp / "out" / "q_quant_param_record.txt").layer("rec")
    assert len(entry.scale_w) == (2 if static else 1) and entry.offset_w == [0] * len(entry.scale_w)
    assert len(entry.scale_r) == {"LSTM": 1, "RNN": 2}.get(kind, 3) and entry.offset_r == [0] * len(entry.scale_r)
    assert entry.scale_h is not None and entry.scale_h > 0 and entry.offset_h is not None
    assert sorted(a.index for a in entry.record_d) == ([0, 2] if static else [0])
    # each weight tensor's scale is ARQ's (NumPy reference) on it alone, per tensor
    float_params = Net(str(flow[3]), str(flow[4]), 1).params["rec"]
    first = 3 if static else 2
    tensors = [0] + ([2] if static else [])
    for s, i in zip(entry.scale_w, tensors, strict=True):
        assert s == _arq_scale(float_params[i].data)
    recurrent = [first, first + 1, first + 2][:len(entry.scale_r)]
    for s, i in zip(entry.scale_r, recurrent, strict=True):
        assert s == _arq_scale(float_params[i].data)


def test_saved_models_track_the_float_model_and_each_other(flow):
    kind, static, tmp, proto, weights = flow
    out = tmp / "out"
    fp = Net(str(proto), str(weights), 1)
    fq = Net(str(out / "q_fake_quant_model.prototxt"), str(out / "q_fake_quant_weights.caffemodel"), 1)
    dp = Net(str(out / "q_deploy_model.prototxt"), str(out / "q_deploy_weights.caffemodel"), 1)
    assert fq.layer_dict["rec"].type == dp.layer_dict["rec"].type == f"{kind.split('_')[0]}Quant"
    stored = load_weights(str(out / "q_deploy_weights.caffemodel"))["rec"]
    assert [a.dtype for a in stored[:2]] == [np.int8, np.int32]
    assert dp.layer_dict["rec"].integer_params
    rng = np.random.default_rng(5)
    for _ in range(3):
        feed = _batch(rng, static)
        a, b, c = _forward(fp, feed), _forward(fq, feed), _forward(dp, feed)
        assert _cosine(a, b) > 0.995
        assert 0 < np.abs(a - b).max()          # quantization did something
        assert _cosine(b, c) > 0.9999           # deploy = fake-quant up to the int32 bias's rounding


def test_convert_model_from_the_saved_record_writes_the_same_models(flow, tmp_path):
    _, _, tmp, proto, weights = flow
    amct.convert_model(str(proto), str(weights), str(tmp / "out" / "q_quant_param_record.txt"),
                       str(tmp_path / "c"))
    for kind in KINDS:
        assert (tmp_path / f"c_{kind}").read_bytes() == (tmp / "out" / f"q_{kind}").read_bytes(), kind


@pytest.mark.parametrize("edit,message", [
    (lambda e: setattr(e, "scale_h", None), "Cannot find scale_h of layer 'rec'"),
    (lambda e: setattr(e, "scale_r", []), "0 scale_r value"),
    (lambda e: setattr(e, "scale_w", e.scale_w[:1] * 3), "3 scale_w value"),
    (lambda e: setattr(e, "offset_r", [5] * len(e.scale_r)), "offset_r must be"),
    # models that would not load, or would hold scale: inf
    (lambda e: setattr(e, "offset_h", 300), r"record.txt: layer 'rec': offset_h 300 is outside the 8-bit range"),
    (lambda e: setattr(e, "scale_h", 1e-45), r"layer 'rec': scale_h is .*; a scale must be a finite number > 0 whose "
                                              r"reciprocal is a float32 too"),
])
def test_convert_model_refuses_an_incomplete_recurrent_record(flow, tmp_path, edit, message):
    _, _, tmp, proto, weights = flow
    record = read_record(tmp / "out" / "q_quant_param_record.txt")
    edit(record.layer("rec"))
    write_record(record, tmp_path / "record.txt")
    with pytest.raises(RecordError, match=message):
        amct.convert_model(str(proto), str(weights), str(tmp_path / "record.txt"), str(tmp_path / "c"))
    assert not list(tmp_path.glob("c_*"))  # nothing written


def test_a_recurrent_layer_takes_only_per_tensor_weights(tmp_path):
    proto, weights = _model(tmp_path, "LSTM", False)
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(proto), str(weights))
    text = config.read_text()
    assert '"rec"' in text
    config.write_text(text.replace('"channel_wise": false', '"channel_wise": true'))
    with pytest.raises(AmctError, match="LSTM supports only channel_wise false"):
        amct.init(str(config), str(proto), str(weights), str(tmp_path / "record.txt"))


def test_fallback_and_compare_treat_the_recurrent_layer_as_one_layer(tmp_path):
    proto, weights = _model(tmp_path, "LSTM", True)
    rng = np.random.default_rng(2)
    batches = [_batch(rng, True) for _ in range(2)]
    result = amct.calibrate_with_fallback(str(proto), str(weights), batches, str(tmp_path / "fb" / "q"), 2,
                                          target_cosine=0.99999999, max_float_layers=1, progress=False)
    # the sensitivity of the LSTM as a whole (x, x_static, the hidden state and its weights together)
    assert set(result.sensitivity) == {"rec", "fc"}
    assert result.sensitivity["rec"] > 0
    worst = max(result.sensitivity, key=result.sensitivity.get)
    assert result.float_layers == [worst]
    fake = tmp_path / "fb" / "q_fake_quant_model.prototxt"
    assert ("LSTMQuant" in fake.read_text()) == (worst != "rec")
    fake_weights = tmp_path / "fb" / "q_fake_quant_weights.caffemodel"
    report = compare_model(str(proto), str(weights), str(fake), str(fake_weights), batches,
                           str(tmp_path / "report"), progress=False)
    # the report names the LSTM's output blob and charges its error to the LSTM
    rows = {row["blob"]: row for row in report["summary"]["most_sensitive_layers"]}
    assert rows["h"]["layer"] == "rec"
    assert (rows["h"]["cosine"] < 1) == (worst != "rec")


def test_compare_model_reads_time_major_inputs_from_a_file(tmp_path):
    """A .npz holds samples first; compare_model serves x and cont time-major, as calibrate's CLI does."""
    proto, weights = _model(tmp_path, "LSTM", False)
    rng = np.random.default_rng(4)
    batches = [_batch(rng, False) for _ in range(2)]
    paths = calibrate(str(proto), str(weights), batches, str(tmp_path / "q" / "q"), 2, progress=False)
    np.savez(tmp_path / "data.npz", x=np.concatenate([b["x"].transpose(1, 0, 2) for b in batches]),
             cont=np.concatenate([b["cont"].T for b in batches]))
    args = (str(proto), str(weights), paths["fake_quant_model"], paths["fake_quant_weights"])
    from_file = compare_model(*args, str(tmp_path / "data.npz"), str(tmp_path / "r1"), batch_num=2, progress=False)
    from_feeds = compare_model(*args, batches, str(tmp_path / "r2"), batch_num=2, progress=False)
    assert from_file["summary"] == from_feeds["summary"]


def test_label_free_qat_refuses_a_recurrent_layer(tmp_path):
    proto, weights = _model(tmp_path, "GRU", False)
    batches = [_batch(np.random.default_rng(5), False)]
    with pytest.raises(AmctError, match="layer 'rec' \\(GRU\\) is recurrent: label-free QAT cannot train through"):
        amct.label_free_retrain(str(proto), str(weights), batches, str(tmp_path / "out" / "q"), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_gru_spelling_out_its_default_activations_quantizes_as_without_them(tmp_path):
    """recurrent_param.activations "Sigmoid" / "TanH" are the GRU's defaults: its calibration and quantized
    forms take them (they used to be refused there as fields of another layer type), and the files are those of
    the same GRU without the field."""
    records = []
    for spelled in (False, True):
        tmp = tmp_path / str(spelled)
        tmp.mkdir()
        proto, weights = _model(tmp, "GRU", False)
        if spelled:
            proto.write_text(proto.read_text().replace("num_output:", 'activations: "Sigmoid" activations: "TanH" '
                                                                      "num_output:", 1))
        feeds = [_batch(np.random.default_rng(4), False)]
        calibrate(str(proto), str(weights), feeds, str(tmp / "q"), 1, progress=False)
        records.append((tmp / "q_quant_param_record.txt").read_text())
        Net(str(tmp / "q_fake_quant_model.prototxt"), str(tmp / "q_fake_quant_weights.caffemodel"), 1)
    assert records[0] == records[1]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_a_smaller_last_batch_calibrates_as_the_same_streams_split_evenly(tmp_path, kind):
    """The IFMR layers of a recurrent layer see (T, N, ...) data: a last batch of fewer streams changes axis 1,
    not the samples' shape (it was refused as 'sample shapes changed'). Its factors are those of the same six
    streams in two batches of three, within float rounding."""
    proto, weights = _model(tmp_path, kind, False)
    rng = np.random.default_rng(5)
    six = {"x": rng.normal(0, 1, (T, 6, D)).astype(np.float32), "cont": np.ones((T, 6), np.float32)}
    six["cont"][0] = 0
    records = []
    for split in ((4, 2), (3, 3)):
        feeds, at = [], 0
        for n in split:
            feeds.append({k: v[:, at:at + n].copy() for k, v in six.items()})
            at += n
        out = tmp_path / f"q{split[0]}"
        calibrate(str(proto), str(weights), feeds, str(out / "q"), 2, progress=False)
        records.append(read_record(str(out / "q_quant_param_record.txt")))
    for name in ("rec", "fc"):
        a, b = records[0].layer(name), records[1].layer(name)
        np.testing.assert_allclose([d.scale_d for d in a.record_d], [d.scale_d for d in b.record_d], rtol=1e-6)
        assert [d.offset_d for d in a.record_d] == [d.offset_d for d in b.record_d]
        if a.scale_h is not None:
            np.testing.assert_allclose(a.scale_h, b.scale_h, rtol=1e-6)


def test_the_report_counts_sequences_and_compares_them_whole(tmp_path):
    """compare_model on an LSTM model (x (T, N, D)): a sample is a sequence (axis 1), not a time step: 8
    sequences in 2 batches of 4 (it said 12 samples), each output's cosine the mean over sequences."""
    proto, weights = _model(tmp_path, "LSTM", False)
    rng = np.random.default_rng(2)
    batches = [_batch(rng, False) for _ in range(2)]
    paths = calibrate(str(proto), str(weights), batches, str(tmp_path / "q" / "q"), 2, progress=False)
    summary = compare_model(str(proto), str(weights), paths["fake_quant_model"], paths["fake_quant_weights"], batches,
                            str(tmp_path / "rep"), progress=False, batch_num=0)["summary"]
    assert summary["samples"] == 2 * N
    fp32, quant = Net(str(proto), str(weights), 1), Net(paths["fake_quant_model"], paths["fake_quant_weights"], 1)
    cosines = []
    for feed in batches:
        a = np.swapaxes(_forward(fp32, feed).reshape(T, N, -1), 0, 1).reshape(N, -1)
        b = np.swapaxes(_forward(quant, feed).reshape(T, N, -1), 0, 1).reshape(N, -1)
        cosines += [_cosine(x, y) for x, y in zip(a, b, strict=True)]
    assert summary["outputs"]["y"]["cosine"] == pytest.approx(float(np.mean(cosines)), rel=0, abs=1e-12)
