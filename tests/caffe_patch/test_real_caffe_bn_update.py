"""update_bn in real Caffe: caffe_patch's BNUpdate layer against Caffe's BatchNorm and the executor.

Opt-in (AMCT_REAL_CAFFE, see tests/conftest.py); the patched build is patched_caffe.py's cache.

(a) Layer: on the same batches, BNUpdate's blobs are bit for bit those of a Caffe BatchNorm with
    use_global_stats false (the rule it implements, with Caffe's own float arithmetic); it stops
    after `iterations` forwards and writes its .npz then, not before; the .npz has the executor's
    keys, dtypes, shapes and values (STATS_TOL, see there).
(b) Flow: a random conv+BN+Scale+ReLU / InnerProduct+BN+Scale net (8 iterations) and open_nsfw
    (53 BatchNorm, 3 iterations) calibrated with update_bn in pycaffe and in the executor: the
    dumps agree within STATS_TOL and save_model gives the same quantized model (scale_w within
    STATS_TOL, scale_d within 1e-6 relative, at most 1 in 10^5 int8 weights one code apart,
    fake-quant outputs within OUTPUT_TOL).
(c) A bad bn_update_param stops Caffe with the executor's message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import GraphError, io
from amct_caffe.io.record import read_record
from amct_caffe.runtime import TEST, Net
from amct_caffe.io.bn_dump import bn_dump_path
from tests.caffe_patch.patched_caffe import REPO, patched_caffe
from tests.golden import MODELS, SHARED

pytestmark = [pytest.mark.real_caffe, pytest.mark.slow]

_LOG = logging.getLogger(__name__)
F32 = np.float32
# Caffe sums a channel in float32 BLAS (sgemv over H*W, then over N), exactly as its BatchNorm
# does; the executor in float64. The moving average only mixes such sums, so the statistics differ
# by float32 summation error: measured with this build's OpenBLAS at most 1.3e-7 on one layer (up
# to 10^5 values per channel) and 2.1e-7 over open_nsfw's 53 BatchNorm layers, whose BNUpdate
# inputs also differ by Caffe's and the executor's convolutions. Bounds: |d mean| <= STATS_TOL *
# (|mean| + std) (a mean near 0 has no relative precision) and |d var| <= STATS_TOL * var; the
# ~50x margin is for BLAS builds that accumulate less carefully.
STATS_TOL = 1e-5


@pytest.fixture(scope="module")
def pycaffe():
    return patched_caffe()


def run_caffe(pycaffe_path: Path, code: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe_path), str(REPO)]), GLOG_minloglevel="0",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=1800, check=False)
    if check:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


def assert_stats_close(mean, var, ref_mean, ref_var, what: str) -> tuple[float, float]:
    """The STATS_TOL bounds; returns the worst (mean, var) errors in units of (|mean| + std, var)."""
    assert mean.dtype == var.dtype == F32 and mean.shape == ref_mean.shape and var.shape == ref_var.shape, what
    scale = np.abs(ref_mean) + np.sqrt(np.maximum(ref_var, 0))
    e_mean = float((np.abs(mean - ref_mean) / scale).max())
    e_var = float((np.abs(var - ref_var) / ref_var).max())
    assert e_mean <= STATS_TOL and e_var <= STATS_TOL, (what, e_mean, e_var)
    return e_mean, e_var


# ------------------------------------------------------------------ (a) the layer
ITERATIONS, FRACTION = 3, 0.7

CAFFE_LAYER = """
import os, sys, numpy as np, caffe
proto, start, batches, dump, out = sys.argv[1:]
caffe.set_mode_cpu()
net = caffe.Net(proto, caffe.TEST)
s = np.load(start)
for layer in ("u", "bn"):
    for i in range(3):
        net.params[layer][i].data[...] = s["b%d" % i]
saved, exists, dumps = {}, [], []
for k, x in enumerate(np.load(batches)["x"]):
    net.blobs["data"].reshape(*x.shape)
    net.blobs["data"].data[...] = x
    net.forward()
    exists.append(os.path.exists(dump))
    dumps.append(open(dump, "rb").read() if exists[-1] else b"")
    for layer in ("u", "bn"):
        for i in range(3):
            saved["%s%d_%d" % (layer, i, k)] = net.params[layer][i].data.copy()
np.savez(out, exists=np.array(exists), same_dump=np.array(dumps[-1] == dumps[-2]), **saved)
"""


def layer_net(shape, dump_dir: Path) -> str:
    dims = "".join(f" dim: {d}" for d in shape)
    return (f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{{dims} }} }} }}\n'
            f'layer {{ name: "u" type: "BNUpdate" bottom: "data" bn_update_param {{ bn_layer: "blk/bn" '
            f'iterations: {ITERATIONS} moving_average_fraction: {FRACTION} dump_dir: "{dump_dir}" }} }}\n'
            f'layer {{ name: "bn" type: "BatchNorm" bottom: "data" top: "y" '
            f'batch_norm_param {{ use_global_stats: false moving_average_fraction: {FRACTION} }} }}\n')


@pytest.mark.parametrize("shape", [(8, 3, 8, 8), (16, 5), (4, 2, 3, 5, 7), (32, 4, 56, 56)],
                         ids=["NCHW", "NC", "NCDHW", "large"])
def test_bn_update_layer_is_caffes_batchnorm_rule_and_dumps_like_the_executor(pycaffe, tmp_path, shape):
    rng = np.random.default_rng(len(shape))
    c = shape[1]
    start = {"b0": (rng.normal(size=c) * 40).astype(F32), "b1": rng.uniform(5, 50, size=c).astype(F32),
             "b2": np.array([9.5], F32)}
    # an offset larger than the spread, as behind a convolution with a bias
    batches = [(rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.uniform(-4, 4)).astype(F32)
               for _ in range(ITERATIONS + 1)]
    np.savez(tmp_path / "start.npz", **start)
    np.savez(tmp_path / "x.npz", x=np.stack(batches))
    dumps = {}
    for who in ("caffe", "executor"):
        (tmp_path / who).mkdir()
        proto = tmp_path / who / "net.prototxt"
        proto.write_text(layer_net(shape, tmp_path / who / "dump"))
        dumps[who] = bn_dump_path(tmp_path / who / "dump", "blk/bn")
    assert dumps["caffe"].name == "blk%2Fbn.npz"

    res = run_caffe(pycaffe, CAFFE_LAYER, tmp_path / "caffe/net.prototxt", tmp_path / "start.npz",
                    tmp_path / "x.npz", dumps["caffe"], tmp_path / "caffe/blobs.npz")
    got = np.load(tmp_path / "caffe/blobs.npz")
    # written after the `iterations`-th forward, not before; the extra forward changes nothing
    assert got["exists"].tolist() == [k >= ITERATIONS - 1 for k in range(ITERATIONS + 1)]
    assert bool(got["same_dump"])
    for k in range(ITERATIONS):
        for i in range(3):
            np.testing.assert_array_equal(got[f"u{i}_{k}"], got[f"bn{i}_{k}"], err_msg=f"blob {i}, batch {k}")
    for i in range(3):
        np.testing.assert_array_equal(got[f"u{i}_{ITERATIONS}"], got[f"u{i}_{ITERATIONS - 1}"])
    for k in range(1, ITERATIONS + 1):
        assert f"BNUpdate 'u': batch {k}/{ITERATIONS} applied to 'blk/bn'" in res.stderr
    assert f"BNUpdate 'u': batch {ITERATIONS + 1}/" not in res.stderr
    assert (f"BNUpdate 'u': statistics of BatchNorm 'blk/bn' refreshed over {ITERATIONS} batch(es), written to "
            f"{dumps['caffe']}") in res.stderr

    net = Net(str(tmp_path / "executor/net.prototxt"), TEST)
    for blob, i in zip(net.layer_dict["u"].blobs, range(3), strict=True):
        blob.data[...] = start[f"b{i}"]
    for x in batches:
        net.forward(data=x)
    with np.load(dumps["caffe"]) as cz, np.load(dumps["executor"]) as ez:
        assert cz.files == ez.files == ["mean", "var", "bn_layer", "iterations"]
        for key in ez.files:
            assert (cz[key].dtype, cz[key].shape) == (ez[key].dtype, ez[key].shape), key
        assert cz["bn_layer"][()] == ez["bn_layer"][()] == "blk/bn"
        assert cz["iterations"][()] == ez["iterations"][()] == ITERATIONS
        # the dump is the blobs divided by the factor, in float32
        f = got[f"u2_{ITERATIONS - 1}"][0]
        np.testing.assert_array_equal(cz["mean"], got[f"u0_{ITERATIONS - 1}"] / f)
        np.testing.assert_array_equal(cz["var"], got[f"u1_{ITERATIONS - 1}"] / f)
        errors = assert_stats_close(cz["mean"], cz["var"], ez["mean"], ez["var"], "dump")
    _LOG.info("BNUpdate %s: Caffe vs executor dump, mean %.3g (|mean| + std), var %.3g relative", shape, *errors)


# ------------------------------------------------------------------ (c) checks
@pytest.mark.parametrize(("param", "message"), [
    ('iterations: 2 moving_average_fraction: 0.5 dump_dir: "d"', "bn_update_param.bn_layer is empty"),
    ('bn_layer: "b" moving_average_fraction: 0.5 dump_dir: "d"', "bn_update_param.iterations must be >= 1, got 0"),
    ('bn_layer: "b" iterations: 2 moving_average_fraction: 1 dump_dir: "d"',
     "bn_update_param.moving_average_fraction must be in (0, 1), got 1"),
    ('bn_layer: "b" iterations: 2 moving_average_fraction: 0.5', "bn_update_param.dump_dir is empty"),
], ids=["bn_layer", "iterations", "fraction", "dump_dir"])
def test_bad_bn_update_param_stops_caffe_like_the_executor(pycaffe, tmp_path, param, message):
    proto = tmp_path / "bad.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
                     f'layer {{ name: "u" type: "BNUpdate" bottom: "data" bn_update_param {{ {param} }} }}\n')
    with pytest.raises(GraphError, match=re.escape(f"layer 'u' (BNUpdate): {message.split(', got')[0]}")):
        Net(str(proto), TEST)
    res = run_caffe(pycaffe, "import sys, caffe; caffe.Net(sys.argv[1], caffe.TEST)", proto, check=False)
    assert res.returncode != 0
    assert f"layer 'u' (BNUpdate): {message}" in res.stderr, res.stderr[-3000:]


def test_channel_mismatch_stops_caffe_like_the_executor(pycaffe, tmp_path):
    """Statistics of 3 channels, a bottom reshaped to 5: the same message in both."""
    proto = tmp_path / "net.prototxt"
    proto.write_text(layer_net((2, 3, 4, 4), tmp_path / "dump"))
    message = "layer 'u' (BNUpdate): the bottom has 5 channels, the statistics blobs 3"
    net = Net(str(proto), TEST)
    net.blobs["data"].reshape(2, 5, 4, 4)
    with pytest.raises(GraphError, match=re.escape(message)):
        net.reshape()
    code = ("import sys, caffe\nnet = caffe.Net(sys.argv[1], caffe.TEST)\n"
            "net.blobs['data'].reshape(2, 5, 4, 4)\nnet.reshape()\n")
    res = run_caffe(pycaffe, code, proto, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-3000:]


# ------------------------------------------------------------------ (b) the whole flow
FLOW_FRACTION, BATCH_NUM = 0.5, 2
MODEL = (
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 12 dim: 12 } } }\n'
    'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 '
    'kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } '
    'bias_filler { type: "constant" value: 0.1 } } }\n'
    'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n'
    'layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true '
    'filler { type: "gaussian" std: 0.5 } bias_filler { type: "constant" value: 0.2 } } }\n'
    'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
    'layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 6 '
    'kernel_size: 3 stride: 2 weight_filler { type: "gaussian" std: 0.2 } bias_filler { type: "constant" '
    'value: -0.3 } } }\n'
    'layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" batch_norm_param { '
    'moving_average_fraction: 0.8 } }\n'
    'layer { name: "sc2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }\n'
    'layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }\n'
    'layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: MAX kernel_size: 2 '
    'stride: 2 } }\n'
    'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 10 '
    'weight_filler { type: "gaussian" std: 0.1 } } }\n'
    'layer { name: "bn3" type: "BatchNorm" bottom: "ip" top: "ip" }\n'
    'layer { name: "sc3" type: "Scale" bottom: "ip" top: "ip" scale_param { bias_term: true } }\n')


def random_net_case(tmp: Path) -> dict:
    """The net above with random weights and stale BatchNorm statistics (a trained-looking factor)."""
    proto = tmp / "model.prototxt"
    proto.write_text(MODEL)
    net = Net(str(proto), TEST, seed=1)
    rng = np.random.default_rng(5)
    for name in ("bn1", "bn2", "bn3"):
        blobs = net.layer_dict[name].blobs
        c = blobs[0].data.size
        factor = F32(999.98)
        blobs[0].data[...] = rng.normal(size=c).astype(F32) * factor
        blobs[1].data[...] = rng.uniform(0.2, 3, size=c).astype(F32) * factor
        blobs[2].data[...] = factor
    weights = tmp / "model.caffemodel"
    net.save(str(weights))
    batches = [(rng.normal(size=(4, 3, 12, 12)) * 1.5 + 0.3).astype(F32) for _ in range(9)]
    return dict(proto=proto, weights=weights, batches=batches[:8], held_out=batches[8])


def open_nsfw_case(tmp: Path) -> dict:
    """ResNet-50-1by2 (53 BatchNorm layers behind convolutions), three batches of two photos."""
    from PIL import Image  # noqa: PLC0415 (test extra)
    files = sorted((SHARED / "data/imagenet_samples").glob("*.JPEG"))[:8]
    mean = np.array([104, 117, 123], np.float32)[:, None, None]
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224)), F32)[:, :, ::-1].transpose(2, 0, 1)
                  - mean for f in files]).astype(F32)
    return dict(proto=MODELS / "open_nsfw/deploy.prototxt",
                weights=MODELS / "open_nsfw/resnet_50_1by2_nsfw.caffemodel",
                batches=[x[0:2], x[2:4], x[4:6]], held_out=x[6:8])


FLOW_CASES = {"random_net": random_net_case, "open_nsfw": open_nsfw_case}
# The two fake-quant models differ by scale_d (IFMR saw Caffe's or the executor's float layers,
# ~5e-7 relative) and by the odd int8 weight code; in ResNet-50 that moves a few activation codes
# across a Quant rounding boundary, and each such flip is a full quantization step the next layers
# spread (test_real_caffe_integration.END_TO_END_TOL; measured 1.7e-4 on prob, 1.5e-8 on random_net).
OUTPUT_TOL = {"random_net": 1e-5, "open_nsfw": 1e-2}

CAFFE_CALIBRATE = """
import sys, numpy as np, caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], sys.argv[2], caffe.TEST)
for path in sys.argv[3:]:
    x = np.load(path)
    net.blobs["data"].reshape(*x.shape)
    net.blobs["data"].data[...] = x
    net.forward()
"""


def calibrate(tmp: Path, case: dict, pycaffe_path: Path | None) -> dict:
    """The PTQ flow with update_bn in ``tmp``; the calibration model runs in Caffe or (None) the executor."""
    tmp.mkdir()
    config, iterations = tmp / "config.json", len(case["batches"])
    amct.create_quant_config(str(config), str(case["proto"]), str(case["weights"]), batch_num=BATCH_NUM)
    content = json.loads(config.read_text())
    content["update_bn"] = True
    content["bn_update_config"] = {"bn_moving_average_fraction": FLOW_FRACTION, "bn_update_iterations": iterations,
                                   "bn_dump_dir": str(tmp / "bn_data")}
    config.write_text(json.dumps(content))
    graph = amct.init(str(config), str(case["proto"]), str(case["weights"]), str(tmp / "record.txt"))
    mm, mw = tmp / "calibration.prototxt", tmp / "calibration.caffemodel"
    amct.weights_quantize_model(graph, str(mm), str(mw))
    amct.activation_quantize_model(graph, str(mm), str(mw))
    assert amct.api.calibration.calibration_forwards(graph) == iterations
    log = ""
    if pycaffe_path is None:
        net = Net(str(mm), str(mw), TEST, ifmr="exact")
        for x in case["batches"]:
            net.forward(data=x)
    else:
        paths = []
        for i, x in enumerate(case["batches"]):
            paths.append(tmp / f"batch{i}.npy")
            np.save(paths[-1], x)
        log = run_caffe(pycaffe_path, CAFFE_CALIBRATE, mm, mw, *paths).stderr
    updates = {lp.bn_update_param.bn_layer: lp for lp in io.read_prototxt(mm).layer if lp.type == "BNUpdate"}
    dumps = {}
    for bn in updates:
        with np.load(bn_dump_path(tmp / "bn_data", bn)) as z:
            dumps[bn] = (z["mean"], z["var"])
    out = amct.save_model(graph, "Both", str(tmp / "res/m"))
    return dict(dumps=dumps, out=out, log=log, updates=updates, iterations=iterations)


@pytest.fixture(scope="module", params=sorted(FLOW_CASES))
def flows(request, pycaffe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    case = FLOW_CASES[request.param](tmp)
    return dict(name=request.param, caffe=calibrate(tmp / "caffe", case, pycaffe),
                executor=calibrate(tmp / "executor", case, None), held_out=case["held_out"])


def test_calibration_model_holds_one_bn_update_per_kept_batchnorm(flows):
    updates, log, n = flows["caffe"]["updates"], flows["caffe"]["log"], flows["caffe"]["iterations"]
    if flows["name"] == "random_net":
        assert sorted(updates) == ["bn1", "bn2", "bn3"]
        # bn2 sets its own moving_average_fraction, which wins over the config's (the guide)
        assert [round(updates[b].bn_update_param.moving_average_fraction, 6) for b in sorted(updates)] == \
            [0.5, 0.8, 0.5]
    else:
        assert len(updates) == 53
    for bn, lp in updates.items():
        assert f"BNUpdate '{lp.name}': batch {n}/{n} applied to '{bn}'" in log
        assert f"statistics of BatchNorm '{bn}' refreshed over {n} batch(es)" in log


def test_caffe_and_executor_calibration_dump_the_same_statistics(flows):
    caffe, executor = flows["caffe"]["dumps"], flows["executor"]["dumps"]
    assert caffe.keys() == executor.keys()
    worst = np.zeros(2)
    for bn in executor:
        worst = np.maximum(worst, assert_stats_close(*caffe[bn], *executor[bn], bn))
    _LOG.info("update_bn %s: %d BatchNorm dumps, Caffe vs executor: mean %.3g (|mean| + std), var %.3g relative",
              flows["name"], len(executor), *worst)


def _record(path):
    rec = read_record(path)
    return {key: (np.array(v.scale_w, F32), {a.index: a.scale_d for a in v.record_d})
            for key, v in rec.layers.items()}


def test_save_model_gives_the_same_quantized_model(flows):
    out_c, out_e = flows["caffe"]["out"], flows["executor"]["out"]
    rec_c, rec_e = _record(out_c["quant_param_record_txt"]), _record(out_e["quant_param_record_txt"])
    assert rec_c.keys() == rec_e.keys()
    worst_w = worst_d = 0.0
    for layer, (scale_w, scale_d) in rec_e.items():
        c_scale_w, c_scale_d = rec_c[layer]
        # scale_w = max |fused weight| / 127 per channel: the statistics' error, scaled by at most 1/2
        np.testing.assert_allclose(c_scale_w, scale_w, rtol=STATS_TOL, err_msg=layer)
        if scale_w.size:
            worst_w = max(worst_w, float((np.abs(c_scale_w - scale_w) / scale_w).max()))
        assert c_scale_d.keys() == scale_d.keys(), layer
        for index, s in scale_d.items():  # IFMR's inputs differ by Caffe's float layers only
            worst_d = max(worst_d, abs(c_scale_d[index] - s) / s)
    assert worst_d <= 1e-6, worst_d
    wc, we = io.load_weights(out_c["deploy_weights"]), io.load_weights(out_e["deploy_weights"])
    fc, fe = io.load_weights(out_c["fake_quant_weights"]), io.load_weights(out_e["fake_quant_weights"])
    assert not set(flows["executor"]["dumps"]) & set(fe)  # every BatchNorm fused again
    flips = codes = 0
    for layer, (scale_w, _) in rec_e.items():
        if not scale_w.size:
            continue
        # int8 codes: a code moves only where a fused weight lies within ~1e-6 of a rounding boundary
        diff = np.abs(wc[layer][0].astype(np.int32) - we[layer][0].astype(np.int32))
        assert diff.max() <= 1, layer
        flips, codes = flips + int(diff.sum()), codes + diff.size
        np.testing.assert_allclose(fc[layer][1], fe[layer][1], rtol=STATS_TOL,
                                   atol=STATS_TOL * float(np.abs(fe[layer][1]).max()), err_msg=layer)
    assert flips <= 1e-5 * codes, (flips, codes)
    name = "prob" if flows["name"] == "open_nsfw" else "ip"
    x = flows["held_out"]
    yc = Net(out_c["fake_quant_model"], out_c["fake_quant_weights"], TEST).forward(data=x)[name]
    ye = Net(out_e["fake_quant_model"], out_e["fake_quant_weights"], TEST).forward(data=x)[name]
    worst_y = float(np.abs(yc - ye).max())
    _LOG.info("update_bn %s: scale_w %.3g, scale_d %.3g relative; %d of %d int8 weights differ; fake-quant "
              "output max |caffe-calibrated - executor-calibrated| = %.3g", flows["name"], worst_w, worst_d, flips,
              codes, worst_y)
    assert worst_y <= OUTPUT_TOL[flows["name"]] * max(1.0, float(np.abs(ye).max()))
    np.testing.assert_array_equal(yc.argmax(axis=1), ye.argmax(axis=1))
