"""The guide's PTQ flow on LeNet and open_nsfw keeps saving the same files.

``regression/saved_outputs.json`` was recorded from the flow before the code was restructured
(issue 9); run this module as a script to record it again after an intended change::

    python -m tests.api.test_saved_outputs_regression

What is compared:

* everything that depends only on the weights, exactly: per layer the scale_w values and the
  digests of the deploy model's int8 weights (except, with update_bn, the layers whose BatchNorm
  statistics the calibration refreshed: their weights depend on the activations, as below);
* the activation factors (scale_d, offset_d), exactly when the machine's BLAS rounds the
  calibration forwards as the recording machine's did, else to 1e-5 relative (a different CPU
  may sum a convolution in another order, moving a clipping bound by an ulp or so);
* when every activation factor is bit-identical, every saved file byte for byte (the int32
  bias, the packed DeQuant scales, the prototxts, quant.json and both record files).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import io
from amct_caffe.runtime import TEST, Net
from tests.api.flow import calibration_model
from tests.golden import MODELS, SHARED

FIXTURE = Path(__file__).parent / "regression" / "saved_outputs.json"
KINDS = ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_model.prototxt",
         "deploy_weights.caffemodel", "quant.json", "quant_param_record.txt", "quant_param_record.bin")


def _lenet_batches():
    z = np.load(SHARED / "data/mnist_5k.npz")
    x = z["images"][:64, None].astype(np.float32) * np.float32(0.00390625)
    return [x[:32], x[32:]]


def _nsfw_batches():
    from PIL import Image

    files = sorted((SHARED / "data/imagenet_samples").glob("*.JPEG"))[:4]
    mean = np.array([104, 117, 123], np.float32)[:, None, None]
    imgs = [(np.asarray(Image.open(f).convert("RGB").resize((224, 224)), np.float32)[:, :, ::-1]
             .transpose(2, 0, 1) - mean) for f in files]
    x = np.stack(imgs).astype(np.float32)
    return [x[0:2], x[2:4]]


NSFW = (MODELS / "open_nsfw/deploy.prototxt", MODELS / "open_nsfw/resnet_50_1by2_nsfw.caffemodel")
#: case -> (prototxt, caffemodel, calibration batches, config edit or None)
CASES = {
    "lenet": (MODELS / "lenet_mnist/lenet.prototxt", MODELS / "lenet_mnist/lenet_iter_10000.caffemodel",
              _lenet_batches, None),
    "open_nsfw": (*NSFW, _nsfw_batches, None),
    # SNQ on two convolutions and update_bn (BatchNorm kept until save_model, statistics refreshed)
    "open_nsfw_snq_update_bn": (*NSFW, _nsfw_batches, "snq_update_bn"),
}


def _snq_update_bn(tmp: Path):
    def edit(config):
        for layer in ("conv_1", "conv_stage1_block0_branch2b"):
            config[layer]["weight_quant_params"] = {
                "wts_algo": "snq_quantize", "channel_wise": True, "num_bits": 4, "max_iteration": 500,
                "min_distance": 1e-6, "init_algo": "d2sampling"}
        config["update_bn"] = True
        config["bn_update_config"] = {"bn_moving_average_fraction": 0.9, "bn_update_iterations": 2,
                                      "bn_dump_dir": str(tmp / "bn_dump")}
    return edit


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _f32_digest(values) -> str:
    """Digest of float32 values and their count (exact: a changed last bit changes it)."""
    a = np.asarray(values, np.float32)
    return f"{a.size}:{_digest(a.tobytes())[:32]}"


def run_flow(name: str, tmp: Path) -> dict:
    """The guide's flow on case ``name`` in ``tmp``; returns what the fixture records."""
    proto, weights, batches_of, edit = CASES[name]
    batches = batches_of()
    graph, mm, mw = calibration_model(tmp, proto, weights, batch_num=len(batches),
                                      edit_config=_snq_update_bn(tmp) if edit else None)
    net = Net(mm, mw, TEST)
    for x in batches:
        net.forward(data=x)
    prefix = tmp / "out" / name
    amct.save_model(graph, "Both", str(prefix))
    files = {kind: _digest(Path(f"{prefix}_{kind}").read_bytes()) for kind in KINDS}
    record = Path(f"{prefix}_quant_param_record.txt").read_text()
    deploy = io.load_weights(f"{prefix}_deploy_weights.caffemodel")
    layers: dict[str, dict] = {}
    for entry in _record_entries(record):
        key = entry.pop("key")
        layers[key] = entry
        if key in deploy and deploy[key][0].dtype == np.int8:
            entry["int8_weights"] = _digest(np.ascontiguousarray(deploy[key][0]).tobytes())
    # update_bn folds statistics measured on the calibration data into these layers' weights
    return {"files": files, "layers": layers, "weights_from_activations": sorted(graph.bn_kept)}


def _record_entries(text: str) -> list[dict]:
    """scale_w (digest) and the activation factors (exact hex floats) of each record entry."""
    from google.protobuf import text_format

    from amct_caffe.io.schema import records

    msg = text_format.Parse(text, records().ScaleOffsetRecord())
    out = []
    for e in msg.record:
        out.append({"key": e.key, "scale_w": _f32_digest(e.value.scale_w),
                    "acts": [{"index": d.index, "scale_d": float(np.float32(d.scale_d)).hex(),
                              "offset_d": d.offset_d} for d in e.value.record_d]})
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    if not (SHARED / "data/mnist_5k.npz").exists():
        pytest.skip("../shared not beside the repository")
    expected = json.loads(FIXTURE.read_text())[request.param]
    return request.param, run_flow(request.param, tmp_path_factory.mktemp(request.param)), expected


def test_weight_factors_and_int8_weights_unchanged(saved):
    _, got, expected = saved
    assert sorted(got["layers"]) == sorted(expected["layers"])
    assert got["weights_from_activations"] == expected["weights_from_activations"]
    same_rounding = _acts_identical(got, expected)
    for key, want in expected["layers"].items():
        if key in expected["weights_from_activations"] and not same_rounding:
            continue  # compared through the saved files where the BLAS rounds alike
        have = got["layers"][key]
        assert have["scale_w"] == want["scale_w"], key
        assert have.get("int8_weights") == want.get("int8_weights"), key


def _acts_identical(got, expected) -> bool:
    return all(got["layers"][k]["acts"] == v["acts"] for k, v in expected["layers"].items())


def test_activation_factors_unchanged(saved):
    _, got, expected = saved
    for key, want in expected["layers"].items():
        have = got["layers"][key]["acts"]
        assert [a["index"] for a in have] == [a["index"] for a in want["acts"]], key
        for a, b in zip(have, want["acts"], strict=True):
            assert float.fromhex(a["scale_d"]) == pytest.approx(float.fromhex(b["scale_d"]), rel=1e-5), key
            assert abs(a["offset_d"] - b["offset_d"]) <= 1, key


def test_saved_files_byte_identical(saved):
    name, got, expected = saved
    if not _acts_identical(got, expected):
        pytest.skip(f"{name}: this machine's BLAS rounds the calibration forwards differently from the "
                    "machine that recorded the fixture; files are compared through their factors only")
    assert got["files"] == expected["files"]


if __name__ == "__main__":  # record the fixture again
    import tempfile

    result = {}
    for case in sorted(CASES):
        with tempfile.TemporaryDirectory() as d:
            result[case] = run_flow(case, Path(d))
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    sys.stdout.write(f"wrote {FIXTURE}\n")
