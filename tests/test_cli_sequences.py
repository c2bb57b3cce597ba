"""The command line on a sequence model: files hold samples first, the recurrent layer reads (T, N, ...).

A .npz with ``x (S, T, D)`` and ``cont (S, T)`` calibrates an LSTM model whose inputs are
``x (T, N, D)`` and ``cont (T, N)``: the batches reach the net transposed, and the batch size is
the model's N. The saved models are the Python API's on the same (transposed) batches, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from amct_caffe import cli
from amct_caffe.api.workflow import calibrate
from amct_caffe.data import open_source, time_major_inputs
from amct_caffe.runtime import Net

T, N, D, DS, S = 5, 2, 3, 4, 6
pytestmark = pytest.mark.usefixtures("cli_scratch_dir")


def _model(root: Path) -> tuple[Path, Path]:
    text = f"""
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: {T} dim: {N} dim: {D} }} }} }}
layer {{ name: "cont" type: "Input" top: "cont" input_param {{ shape {{ dim: {T} dim: {N} }} }} }}
layer {{ name: "s" type: "Input" top: "s" input_param {{ shape {{ dim: {N} dim: {DS} }} }} }}
layer {{ name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" bottom: "s" top: "h"
  recurrent_param {{ num_output: 4 weight_filler {{ type: "uniform" min: -0.5 max: 0.5 }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "h" top: "y"
  inner_product_param {{ num_output: 3 axis: 2 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
"""
    proto, weights = root / "seq.prototxt", root / "seq.caffemodel"
    proto.write_text(text)
    Net(str(proto), phase=1, seed=4).save(str(weights))
    return proto, weights


def _data(root: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    cont = np.ones((S, T), np.float32)
    cont[:, 0] = 0
    arrays = {"x": rng.normal(size=(S, T, D)).astype(np.float32), "cont": cont,
              "s": rng.normal(size=(S, DS)).astype(np.float32)}
    path = root / "seq.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_sequence_inputs_are_found_and_served_time_major(tmp_path):
    proto, _ = _model(tmp_path)
    assert time_major_inputs(proto) == ["x", "cont"]   # the static input keeps the batch first
    path, arrays = _data(tmp_path)
    source = open_source(path, {"x": (T, N, D), "cont": (T, N), "s": (N, DS)}, N, time_major=["x", "cont"])
    batches = list(source)
    assert len(batches) == S // N
    for b, batch in enumerate(batches):
        rows = slice(b * N, (b + 1) * N)
        np.testing.assert_array_equal(batch["x"], arrays["x"][rows].transpose(1, 0, 2))
        np.testing.assert_array_equal(batch["cont"], arrays["cont"][rows].T)
        np.testing.assert_array_equal(batch["s"], arrays["s"][rows])


def test_calibrate_command_on_a_sequence_model_saves_what_the_api_saves(tmp_path):
    proto, weights = _model(tmp_path)
    path, arrays = _data(tmp_path)
    assert cli.main(["calibrate", "--model", str(proto), "--weights", str(weights), "--data", str(path),
                     "--batch-num", "3", "--output", "out/seq", "--no-progress", "--no-summary"]) == 0
    batches = [{"x": arrays["x"][i:i + N].transpose(1, 0, 2).copy(), "cont": arrays["cont"][i:i + N].T.copy(),
                "s": arrays["s"][i:i + N]} for i in range(0, S, N)]
    calibrate(str(proto), str(weights), batches, str(tmp_path / "api" / "seq"), 3, progress=False)
    for kind in ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_weights.caffemodel",
                 "quant_param_record.txt"):
        assert Path(f"out/seq_{kind}").read_bytes() == (tmp_path / "api" / f"seq_{kind}").read_bytes(), kind


def test_inputs_reaching_the_recurrent_layer_through_other_layers_are_time_major(tmp_path):
    """Caffe's language models: words (T, N) -> Embed -> LSTM; features through an InnerProduct on axis 2, a
    ReLU and a Concat on axis 2 keep (T, N) too. A static input through an InnerProduct on axis 1 does not."""
    text = f"""
layer {{ name: "in" type: "Input" top: "words" top: "feats" top: "cont" top: "s"
  input_param {{ shape {{ dim: {T} dim: {N} }} shape {{ dim: {T} dim: {N} dim: 7 }} shape {{ dim: {T} dim: {N} }}
                 shape {{ dim: {N} dim: 9 }} }} }}
layer {{ name: "embed" type: "Embed" bottom: "words" top: "emb"
  embed_param {{ num_output: 3 input_dim: 10 weight_filler {{ type: "uniform" min: -1 max: 1 }} }} }}
layer {{ name: "proj" type: "InnerProduct" bottom: "feats" top: "proj"
  inner_product_param {{ num_output: 2 axis: 2 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "proj" top: "proj" }}
layer {{ name: "cat" type: "Concat" bottom: "emb" bottom: "proj" top: "x" concat_param {{ axis: 2 }} }}
layer {{ name: "sproj" type: "InnerProduct" bottom: "s" top: "sp"
  inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" bottom: "sp" top: "h"
  recurrent_param {{ num_output: 4 weight_filler {{ type: "uniform" min: -0.5 max: 0.5 }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "h" top: "y"
  inner_product_param {{ num_output: 3 axis: 2 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
"""
    proto, weights = tmp_path / "lm.prototxt", tmp_path / "lm.caffemodel"
    proto.write_text(text)
    Net(str(proto), phase=1, seed=4).save(str(weights))
    assert sorted(time_major_inputs(proto)) == ["cont", "feats", "words"]
    rng = np.random.default_rng(1)
    cont = np.ones((S, T), np.float32)
    cont[:, 0] = 0
    arrays = {"words": rng.integers(0, 10, (S, T)).astype(np.float32), "feats": rng.normal(size=(S, T, 7)),
              "cont": cont, "s": rng.normal(size=(S, 9))}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    np.savez(tmp_path / "lm.npz", **arrays)
    assert cli.main(["calibrate", "--model", str(proto), "--weights", str(weights), "--data", str(tmp_path / "lm.npz"),
                     "--batch-num", "3", "--output", "out/lm", "--no-progress", "--no-summary"]) == 0
    batches = [{k: (v[i:i + N] if k == "s" else np.swapaxes(v[i:i + N], 0, 1)).copy() for k, v in arrays.items()}
               for i in range(0, S, N)]
    calibrate(str(proto), str(weights), batches, str(tmp_path / "api" / "lm"), 3, progress=False)
    for kind in ("fake_quant_weights.caffemodel", "quant_param_record.txt"):
        assert Path(f"out/lm_{kind}").read_bytes() == (tmp_path / "api" / f"lm_{kind}").read_bytes(), kind


def test_run_saves_a_sequence_output_samples_first(tmp_path, capsys):
    """amct-caffe run on an LSTM model: the output y (T, N, 3) of each batch is saved samples first, (S, T, 3),
    equal to the model run on the transposed batches, the last, smaller batch included; it is not ranked."""
    proto, weights = _model(tmp_path)
    _, arrays = _data(tmp_path)
    odd = {k: np.concatenate([v, v[:1]]) for k, v in arrays.items()}  # 7 samples: batches of 2, 2, 2, 1
    np.savez(tmp_path / "odd.npz", **odd)
    assert cli.main(["run", "--model", str(proto), "--weights", str(weights), "--input", str(tmp_path / "odd.npz"),
                     "--save", "y.npz", "--no-progress"]) == 0
    assert "blob 'y' is a sequence" in capsys.readouterr().out
    with np.load("y.npz") as z:
        saved = z["y"]
    net = Net(str(proto), str(weights), 1)
    want = []
    for i in range(0, S + 1, N):
        rows = slice(i, i + N)
        got = net.forward(x=odd["x"][rows].transpose(1, 0, 2).copy(), cont=odd["cont"][rows].T.copy(),
                          s=odd["s"][rows])
        want.append(np.swapaxes(np.array(got["y"]), 0, 1))
    assert saved.shape == (S + 1, T, 3)
    np.testing.assert_array_equal(saved, np.concatenate(want))


def test_layers_that_keep_the_batch_on_axis_1_carry_time_major_values():
    """After an LSTM (y: T, N, H): a Slice or Concat along the time axis 0, a Reshape copying the first two axes,
    a Permute keeping them and a Flatten from axis 2 keep the batch on axis 1 (a report compared the last time
    step's slice per batch, and `run` saved it batches first); a Permute swapping the first two axes and a
    Slice along axis 1 do not."""
    from google.protobuf import text_format

    from amct_caffe import ops
    from amct_caffe.io.schema import caffe_pb

    text = """
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "y" recurrent_param { num_output: 4 } }
layer { name: "t" type: "Slice" bottom: "y" top: "head" top: "last" slice_param { axis: 0 slice_point: 9 } }
layer { name: "r" type: "Reshape" bottom: "last" top: "r" reshape_param { shape { dim: 0 dim: 0 dim: -1 } } }
layer { name: "p" type: "Permute" bottom: "r" top: "p" permute_param { order: 0 order: 1 order: 2 } }
layer { name: "f" type: "Flatten" bottom: "p" top: "f" flatten_param { axis: 2 } }
layer { name: "c" type: "Concat" bottom: "head" bottom: "last" top: "c" concat_param { axis: 0 } }
layer { name: "swap" type: "Permute" bottom: "y" top: "batch_first" permute_param { order: 1 order: 0 order: 2 } }
layer { name: "n" type: "Slice" bottom: "y" top: "n0" top: "n1" slice_param { axis: 1 } }
layer { name: "features" type: "Concat" bottom: "y" bottom: "y" top: "wide" concat_param { axis: -1 } }
"""
    net = text_format.Parse(text, caffe_pb().NetParameter())
    found = ops.time_major_blobs(net.layer, downstream=True)
    assert set(found) == {"x", "cont", "y", "head", "last", "r", "p", "f", "c", "wide"}
