"""The retrain layers in patched real Caffe and in the executor, on the same nets and inputs.

Opt-in (AMCT_REAL_CAFFE; the patched build is patched_caffe.py's cache). One script (SCRIPT) drives
both sides through the pycaffe API: run in a subprocess with the patched Caffe as ``caffe``, and
in this process with ``amct_caffe.runtime`` as ``caffe``. Every scenario records the named blobs'
data and diff and every learned blob's data and diff after each step.

What the retrain layers compute is *bit-identical* on both sides: forward tops, x's gradients,
clip_max/clip_min after ClipCheck / ifmr_init and their gradients (accumulated over two passes),
the fake-quantized and float weights, and the TEST-phase record (equal values; C++ protobuf
spells floats with %.9g, Python with the shortest decimal). The one inexact input is the object
layer's weight gradient, a BLAS sum in another order than Caffe's OpenBLAS gemm (at most 64 float32
ulps, 1.3e-7 of the array's scale, for the Convolution and Deconvolution; the InnerProduct's is
exact): the float weight's gradient is that gradient copied, so it differs by exactly as much,
and on each side it equals the object layer's bit for bit. Solver runs (SGD; momentum, weight
decay and iter_size 2 in the second) start bit-identical, take their first step's clip updates
bit-identical, and stay within 1e-6 of each array's scale over 5 steps.

The nets are test_real_caffe_retrain.py's (RetrainDataQuant in and out of place, 8/12 bits,
fixed_min, ClipCheck's rules, ifmr_init, the TEST-phase record; RetrainWeightQuant before a
Convolution, an InnerProduct and a Deconvolution) plus an in-place RetrainWeightQuant and a second
training net.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import amct_caffe.runtime as executor
from amct_caffe.io.record import parse_record_text
from tests.caffe_patch.patched_caffe import REPO, patched_caffe
from tests.caffe_patch.test_real_caffe_retrain import (ARQ_CASES, CLIP_STEPS, SOLVER, SOLVER_NET, ULQ_CASES,
                                                       _clip_values, _ulq_x, arq_net, ulq_net)

pytestmark = [pytest.mark.real_caffe, pytest.mark.slow]

F32 = np.float32

# Runs the scenarios of spec.json with whatever module is ``caffe``; ``run(caffe, work)`` returns
# {key: array}. Ops: ["data"|"diff", blob, input], ["param", layer, i, input],
# ["value", layer, i, float] (element 0), ["forward"], ["backward"], ["step", n],
# ["snap", tag, [blobs]], ["file", tag, path].
SCRIPT = r'''
import json
import numpy as np

def run(caffe, work):
    with open(work + "/spec.json") as f:
        spec = json.load(f)
    load = lambda name: np.load(f"{work}/{name}.npy")
    out = {}
    for name, sc in spec.items():
        if "solver" in sc:
            solver = caffe.SGDSolver(sc["solver"])
            net = solver.net
        else:
            solver, net = None, caffe.Net(sc["proto"], caffe.TRAIN if sc["phase"] == "train" else caffe.TEST)
        for op in sc["ops"]:
            kind = op[0]
            if kind == "data":
                net.blobs[op[1]].data[...] = load(op[2])
            elif kind == "diff":
                net.blobs[op[1]].diff[...] = load(op[2])
            elif kind == "param":
                net.params[op[1]][op[2]].data[...] = load(op[3])
            elif kind == "value":
                net.params[op[1]][op[2]].data[0] = op[3]
            elif kind == "forward":
                net.forward()
            elif kind == "backward":
                net.backward()
            elif kind == "step":
                solver.step(op[1])
            elif kind == "snap":
                tag = f"{name}/{op[1]}"
                for blob in op[2]:
                    out[f"{tag}/blob/{blob}/data"] = np.array(net.blobs[blob].data)
                    out[f"{tag}/blob/{blob}/diff"] = np.array(net.blobs[blob].diff)
                for layer, blobs in net.params.items():
                    for i, b in enumerate(blobs):
                        out[f"{tag}/param/{layer}/{i}/data"] = np.array(b.data)
                        out[f"{tag}/param/{layer}/{i}/diff"] = np.array(b.diff)
            elif kind == "file":
                with open(op[2], "rb") as f:
                    out[f"{name}/{op[1]}"] = np.frombuffer(f.read(), np.uint8)
    return out
'''

CAFFE_MAIN = SCRIPT + r'''
import sys
import caffe
caffe.set_mode_cpu()
np.savez(sys.argv[1] + "/out.npz", **run(caffe, sys.argv[1]))
'''

# A second training net: a ReLU before RetrainDataQuant with fixed_min and ifmr_init, an
# InnerProduct (per-tensor ARQ) with a bias, trained with momentum, weight decay and iter_size 2.
SOLVER_NET_IP = (
    'layer { name: "data" type: "Input" top: "x" top: "t" input_param { shape { dim: 4 dim: 6 } '
    "shape { dim: 4 dim: 3 } } }\n"
    'layer { name: "relu" type: "ReLU" bottom: "x" top: "r" }\n'
    'layer { name: "dq" type: "RetrainDataQuant" bottom: "r" top: "rq" '
    "retrain_data_quant_param { fixed_min: true ifmr_init: true } }\n"
    'layer { name: "wq" type: "RetrainWeightQuant" bottom: "rq" top: "rw" '
    'param { name: "ip_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 } '
    'retrain_weight_quant_param { cout: 3 cin: 6 layer_type: "InnerProduct" channel_wise: false } }\n'
    'layer { name: "ip" type: "InnerProduct" bottom: "rw" top: "y" param { name: "ip_w" } param { lr_mult: 2 } '
    'inner_product_param { num_output: 3 bias_filler { type: "constant" value: 0.1 } } }\n'
    'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }\n')
SOLVER_IP = ('net: "{net}"\nbase_lr: 0.01\nlr_policy: "step"\ngamma: 0.5\nstepsize: 2\nmomentum: 0.9\n'
             "weight_decay: 0.0005\niter_size: 2\nmax_iter: 10\ndisplay: 0\nsnapshot: 0\nsolver_mode: CPU\n")
STEPS = 5


def _scenarios(work) -> tuple[dict, dict]:
    """(spec, inputs): the scenarios both sides run and the arrays they load."""
    rng = np.random.default_rng(2024)
    spec: dict = {}
    inputs: dict[str, np.ndarray] = {}

    def net(name: str, text: str, ops: list, phase: str = "train") -> None:
        (work / f"{name}.prototxt").write_text(text)
        spec[name] = {"proto": str(work / f"{name}.prototxt"), "phase": phase, "ops": ops}

    for i, (name, (param, shape, in_place, bits, fixed_min, scale, shift)) in enumerate(ULQ_CASES.items()):
        cmax, cmin = _clip_values(param)
        top = "x" if in_place else "y"
        inputs[f"{name}_x"] = _ulq_x(shape, bits, cmax, 0.0 if fixed_min else cmin, scale, shift, i)
        inputs[f"{name}_g"] = rng.standard_normal(shape).astype(F32)
        blobs = ["x"] if in_place else ["x", "y"]
        ops = [["data", "x", f"{name}_x"], ["forward"], ["diff", top, f"{name}_g"], ["backward"], ["snap", "0", blobs],
               # moved clips, and a second backward accumulating into the clip diffs
               ["data", "x", f"{name}_x"], ["value", "dq", 0, cmax * 1.25], ["forward"],
               ["diff", top, f"{name}_g"], ["backward"], ["snap", "1", blobs]]
        net(f"ulq_{name}", ulq_net(param, shape, in_place), ops)

    inputs["clip_x"] = (rng.standard_normal((3, 50)) * 1.2).astype(F32)
    inputs["clip_g"] = rng.standard_normal((3, 50)).astype(F32)
    ops = [["data", "x", "clip_x"]]
    for k, step in enumerate(CLIP_STEPS):
        if step is not None:
            ops += [["value", "dq", 0, step[0]], ["value", "dq", 1, step[1]]]
        ops += [["forward"], ["diff", "y", "clip_g"], ["backward"], ["snap", str(k), ["x", "y"]]]
    net("clip_check", ulq_net("clip_max: 1.5 clip_min: -1.0", (3, 50), False), ops)

    ops = []
    for k in range(2):
        inputs[f"ifmr_x{k}"] = (rng.standard_normal((4, 3, 8, 8)) * (1 + k) + 0.3).astype(F32)
        inputs[f"ifmr_g{k}"] = rng.standard_normal((4, 3, 8, 8)).astype(F32)
        ops += [["data", "x", f"ifmr_x{k}"], ["forward"], ["diff", "y", f"ifmr_g{k}"],
                ["backward"], ["snap", str(k), ["x", "y"]]]
    net("ifmr_init", ulq_net("ifmr_init: true num_bits: 8", (4, 3, 8, 8), False), ops)

    for side in ("caffe", "executor"):  # each side writes its own record file
        record = work / f"record_{side}.txt"
        net(f"record_{side}", ulq_net(f'clip_max: 1.5 clip_min: -1.0 object_layer: "conv9" '
                                      f'record_file_path: "{record}"', (3, 50), False),
            [["data", "x", "clip_x"], ["forward"], ["file", "0", str(record)], ["value", "dq", 0, 4.0],
             ["forward"], ["file", "1", str(record)], ["snap", "s", ["y"]]], phase="test")

    conv = ARQ_CASES["conv_channel_wise"]
    arq_cases = dict(ARQ_CASES, conv_in_place=conv, conv_obj_lr0=conv)
    for name, (layer_type, wshape, xshape, obj, cw) in arq_cases.items():
        text = arq_net(layer_type, wshape, xshape, obj, cw)
        if name == "conv_obj_lr0":  # lr_mult 0 on the object layer's side of the shared weight
            # (force_backward would switch every param gradient on: y is a loss instead)
            text = text.replace("force_backward: true\n", "").replace(
                'param { name: "obj_w" }', 'param { name: "obj_w" lr_mult: 0 decay_mult: 0 } loss_weight: 1')
        if name == "conv_in_place":
            text = text.replace('top: "xq"', 'top: "x"').replace('bottom: "xq"', 'bottom: "x"')
        w = (rng.standard_normal(wshape) * 0.2).astype(F32)
        w.reshape(-1)[0], w.reshape(-1)[-1] = 0.37, -0.41
        inputs[f"{name}_w"], inputs[f"{name}_x"] = w, rng.standard_normal(xshape).astype(F32)
        y_shape = (xshape[0], wshape[0]) if layer_type == "InnerProduct" else (2, 4, 4, 4)
        inputs[f"{name}_g"] = rng.standard_normal(y_shape).astype(F32)
        blobs = ["x", "y"] if name == "conv_in_place" else ["x", "xq", "y"]
        net(f"arq_{name}", text, [["param", "obj", 0, f"{name}_w"], ["data", "x", f"{name}_x"], ["forward"],
                                  ["diff", "y", f"{name}_g"], ["backward"], ["snap", "0", blobs],
                                  ["diff", "y", f"{name}_g"], ["backward"], ["snap", "1", blobs]])

    for name, (text, solver, w, x, t) in {
        "solver_conv": (SOLVER_NET, SOLVER, (4, 3, 3, 3), (2, 3, 6, 6), (2, 4, 4, 4)),
        "solver_ip": (SOLVER_NET_IP, SOLVER_IP, (3, 6), (4, 6), (4, 3)),
    }.items():
        (work / f"{name}_net.prototxt").write_text(text)
        (work / f"{name}.prototxt").write_text(solver.format(net=work / f"{name}_net.prototxt"))
        layer = "conv" if name == "solver_conv" else "ip"
        inputs[f"{name}_w"] = (rng.standard_normal(w) * 0.3).astype(F32)
        inputs[f"{name}_x"] = (rng.standard_normal(x) * 1.3).astype(F32)
        inputs[f"{name}_t"] = rng.standard_normal(t).astype(F32)
        blobs = ["x", "loss"]
        ops = [["param", layer, 0, f"{name}_w"], ["data", "x", f"{name}_x"], ["data", "t", f"{name}_t"],
               ["forward"], ["snap", "start", blobs]]
        for k in range(STEPS):
            ops += [["step", 1], ["snap", str(k), blobs]]
        spec[name] = {"solver": str(work / f"{name}.prototxt"), "ops": ops}

    # the deploy-side layers a fake-quant model holds, trained through: Quant and DeQuant copy the top
    # diff, AntiQuant shares it (caffe_patch)
    inputs["chain_x"] = (rng.standard_normal((2, 4, 3, 3)) * 0.3).astype(F32)
    inputs["chain_g"] = rng.standard_normal((2, 4, 3, 3)).astype(F32)
    inputs["chain_deq"] = rng.uniform(0.5, 2.0, 4).astype(F32)
    net("quant_chain", "force_backward: true\n"
        'layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 dim: 3 dim: 3 } } }\n'
        'layer { name: "q" type: "Quant" bottom: "x" top: "xq" quant_param { scale: 20 offset: 3 } }\n'
        'layer { name: "dq" type: "DeQuant" bottom: "xq" top: "xd" dequant_param { channel_wise: true } }\n'
        'layer { name: "aq" type: "AntiQuant" bottom: "xd" top: "y" quant_param { scale: 1 } }\n',
        [["param", "dq", 0, "chain_deq"], ["data", "x", "chain_x"], ["forward"], ["diff", "y", "chain_g"],
         ["backward"], ["snap", "0", ["x", "xq", "xd", "y"]]])
    return spec, inputs


def _write(work, spec: dict, inputs: dict, only: str) -> None:
    """spec.json without the other side's record scenario, and the inputs."""
    for key, value in inputs.items():
        np.save(work / f"{key}.npy", value)
    other = "executor" if only == "caffe" else "caffe"
    (work / "spec.json").write_text(json.dumps({k: v for k, v in spec.items() if k != f"record_{other}"}))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(Caffe's outputs, the executor's outputs), record keys renamed to one name."""
    pycaffe = patched_caffe()
    work = tmp_path_factory.mktemp("retrain_vs_executor")
    spec, inputs = _scenarios(work)
    _write(work, spec, inputs, "caffe")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe), str(REPO)]), GLOG_minloglevel="2",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", CAFFE_MAIN, str(work)], env=env, capture_output=True, text=True,
                         timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(work / "out.npz") as z:
        caffe_out = {k.replace("record_caffe/", "record/"): z[k] for k in z.files}
    _write(work, spec, inputs, "executor")
    scope: dict = {}
    exec(compile(SCRIPT, "SCRIPT", "exec"), scope)  # noqa: S102 - the very script Caffe ran
    ours = {k.replace("record_executor/", "record/"): v for k, v in scope["run"](executor, str(work)).items()}
    return caffe_out, ours


def _keys(out: dict, prefix: str) -> list[str]:
    return sorted(k for k in out if k.startswith(prefix + "/"))


def _compare(both, prefix: str, inexact=lambda key: False) -> None:
    """Every array of the scenario bit-identical, except where ``inexact(key)``: within RTOL of the
    array's largest magnitude (the project's measure for BLAS results, tests/training)."""
    caffe_out, ours = both
    keys = _keys(caffe_out, prefix)
    assert keys and keys == _keys(ours, prefix)
    for key in keys:
        want, got = caffe_out[key], np.asarray(ours[key])
        assert want.shape == got.shape and want.dtype == got.dtype, key
        if not inexact(key):
            np.testing.assert_array_equal(got, want, err_msg=key)
            continue
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
        assert err <= RTOL * max(scale, 1e-3), f"{key}: max |diff| {err:.3g} vs scale {scale:.3g}"


# The object layer's weight gradient is a BLAS sum whose order differs from Caffe's OpenBLAS gemm
# (Convolution/Deconvolution: measured at most 64 float32 ulps, 1.3e-7 of the array's scale); the
# retrain layer copies it, so the float weight's gradient inherits exactly that difference.
RTOL = 1e-6
_OBJECT_WEIGHT_GRAD = ("/param/obj/0/diff", "/param/wq/0/diff", "/param/wq/1/diff")


@pytest.mark.parametrize("name", [f"ulq_{n}" for n in ULQ_CASES] + ["clip_check", "ifmr_init"])
def test_retrain_data_quant_forward_and_backward_identical(both, name):
    _compare(both, name)
    caffe_out, _ = both
    assert caffe_out[f"{name}/0/param/dq/0/diff"][0] != 0  # the clip gradients were really exercised


def test_test_phase_record_identical(both):
    """The same record; only the float's spelling may differ (C++ protobuf prints %.9g, Python the
    shortest decimal: 0.0196078438 and 0.019607844 are one float32)."""
    caffe_out, ours = both
    records = []
    for k in ("0", "1"):
        theirs, mine = (parse_record_text(out[f"record/{k}"].tobytes().decode()) for out in (caffe_out, ours))
        assert mine == theirs
        records.append(mine)
    acts = [r.layer("conv9").activation(0) for r in records]
    assert acts[0].scale_d != acts[1].scale_d  # the second forward's new grid was written
    assert (acts[1].channels, acts[1].height, acts[1].width, acts[1].num_bits_d) == (50, 1, 1, 8)


@pytest.mark.parametrize("name", [f"arq_{n}" for n in ARQ_CASES] + ["arq_conv_in_place"])
def test_retrain_weight_quant_forward_and_backward_identical(both, name):
    """Fake-quantized weight, float weight, tops and x's gradient bit-identical; the weight gradient
    within the object layer's BLAS rounding, and on each side the float weight's is its exact copy."""
    _compare(both, name, lambda key: key.endswith(_OBJECT_WEIGHT_GRAD))
    for out in both:
        for k in ("0", "1"):
            np.testing.assert_array_equal(out[f"{name}/{k}/param/wq/1/diff"], out[f"{name}/{k}/param/obj/0/diff"])
    caffe_out, _ = both
    fake, weight = caffe_out[f"{name}/0/param/wq/0/data"], caffe_out[f"{name}/0/param/wq/1/data"]
    assert not np.array_equal(fake, weight) and np.count_nonzero(caffe_out[f"{name}/0/param/wq/1/diff"])


def test_object_layer_lr_mult_0_leaves_the_float_weight_without_gradient(both):
    """Caffe's param_propagate_down is the object layer's own ParamSpec: with lr_mult 0 there the
    Convolution computes no weight gradient, so RetrainWeightQuant copies zeros (both sides)."""
    _compare(both, "arq_conv_obj_lr0")
    for out in both:
        assert not out["arq_conv_obj_lr0/0/param/obj/0/diff"].any()
        assert not out["arq_conv_obj_lr0/0/param/wq/1/diff"].any()


@pytest.mark.parametrize("name", ["solver_conv", "solver_ip"])
def test_solver_steps_agree(both, name):
    """Before training everything is bit-identical, and so are the first step's clip values and
    clip gradients; afterwards the object layer's rounding (and the solver's momentum update,
    tests/training/test_solvers_real.py) spreads within RTOL."""
    exact = (f"{name}/start/", f"{name}/0/param/dq/")
    _compare(both, name, lambda key: not key.startswith(exact))
    caffe_out, _ = both
    first, last = caffe_out[f"{name}/start/blob/loss/data"], caffe_out[f"{name}/{STEPS - 1}/blob/loss/data"]
    assert last < first
    for layer, i in (("dq", 0), ("wq", 1)):  # training moved the clip and the float weight
        assert not np.array_equal(caffe_out[f"{name}/start/param/{layer}/{i}/data"],
                                  caffe_out[f"{name}/{STEPS - 1}/param/{layer}/{i}/data"])


def test_quant_layers_pass_the_gradient_straight_through(both):
    """Quant, DeQuant and AntiQuant forward and backward bit-identical: x's gradient is y's."""
    _compare(both, "quant_chain")
    caffe_out, _ = both
    np.testing.assert_array_equal(caffe_out["quant_chain/0/blob/x/diff"], caffe_out["quant_chain/0/blob/y/diff"])
