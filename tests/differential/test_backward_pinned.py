"""Pinned nets from the backward differential sweep, each the smallest form of one root cause.

Every net runs with ``force_backward`` in the TEST phase in official Caffe and in the executor
(random diffs on the outputs, as :mod:`tests.differential.test_backward_differential`), and every
blob diff and learned-blob diff must agree (a net of ``NOISY`` up to ``cancelled_noise``); a net
of ``REFUSED`` aborts Caffe and must make the executor raise a GraphError. The comment above each
case says what it pins.
"""

from __future__ import annotations

import numpy as np
import pytest

from amct_caffe.errors import GraphError
from tests.differential.test_backward_differential import cancelled_noise
from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import caffe_grads, executor_grads, grad_problems, run_in_caffe

pytestmark = pytest.mark.real_caffe


def _input(*dims, name="data"):
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


_RELU_IN_PLACE = 'layer {{ name: "relu" type: "ReLU" bottom: "{b}" top: "{b}" relu_param {{ negative_slope: 0.3 }} }}\n'
_TANH = 'layer { name: "tanh" type: "TanH" bottom: "data" top: "a" }\n'

_RNN_SCALED = ('layer { name: "rnn" type: "RNN" bottom: "data" bottom: "cont" top: "o" '
               'recurrent_param { num_output: 5 weight_filler { type: "uniform" min: -0.5 max: 0.5 } } }\n'
               'layer { name: "s" type: "Scale" bottom: "o" top: "o" scale_param { filler { value: -1.7 } } }\n')

# name: (prototxt body, {input: shape or array})
CASES = {
    # Reshape's top shares its bottom's diff memory (ShareDiff in Reshape): the in-place ReLU
    # below the Reshape rewrites the diff the Reshape's output shows after the backward
    "reshape_shares_diff": (_input(2, 3, 4) + _TANH + _RELU_IN_PLACE.format(b="a") +
                            'layer { name: "r" type: "Reshape" bottom: "a" top: "r" '
                            'reshape_param { shape { dim: 6 dim: 4 } } }\n', {"data": (2, 3, 4)}),
    # the same through a one-bottom Concat
    "concat1_shares_diff": (_input(2, 3, 4) + _TANH + _RELU_IN_PLACE.format(b="a") +
                            'layer { name: "c" type: "Concat" bottom: "a" top: "c" }\n', {"data": (2, 3, 4)}),
    # Flatten's backward points its bottom's diff at its top's memory, which detaches the bottom
    # from the memory it shared with the Reshape below: the Reshape's bottom keeps a diff nobody
    # writes (zero), and so does everything under it
    "flatten_detaches_reshape": (_input(2, 3, 4) + _TANH +
                                 'layer { name: "r" type: "Reshape" bottom: "a" top: "r" '
                                 'reshape_param { shape { dim: 2 dim: 12 } } }\n' +
                                 _RELU_IN_PLACE.format(b="r") +
                                 'layer { name: "f" type: "Flatten" bottom: "r" top: "f" }\n', {"data": (2, 3, 4)}),
    # an in-place MVN (normalize_variance): Caffe's backward builds the bottom diff in the top
    # diff's memory while still reading it, and its axpby scales before it adds
    "mvn_in_place": (_input(2, 3, 4, 5) + _TANH +
                     'layer { name: "mvn" type: "MVN" bottom: "a" top: "a" }\n', {"data": (2, 3, 4, 5)}),
    # MAX pooling's backward reads the mask top's data as indices (from each plane's start, into
    # the whole bottom): an in-place layer on the mask moves the diffs, here to half the index
    "pool_mask_rewritten": (_input(2, 2, 5, 6) +
                            'layer { name: "p" type: "Pooling" bottom: "data" top: "p" top: "m" '
                            'pooling_param { pool: MAX kernel_size: 2 stride: 1 } }\n'
                            'layer { name: "half" type: "Power" bottom: "m" top: "m" power_param { scale: 0.5 } }\n',
                            {"data": (2, 2, 5, 6)}),
    # Power with shift 0 back-propagates power * y / x, 0/0 = NaN where the ReLU gave 0: Caffe's
    # diffs hold NaN, the executor's must hold NaN at the same places (and agree elsewhere)
    "power_nan_at_zero": (_input(2, 3, 4) +
                          'layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }\n'
                          'layer { name: "cube" type: "Power" bottom: "r" top: "c" power_param { power: 3 } }\n',
                          {"data": (2, 3, 4)}),
    # Exp then a log near 1 (ln(1.0004)), in place (the bottom diff is (1 / (y ln 2))^2): an ulp of
    # exp becomes 3e-4 of the log and 6e-4 of the diff. Caffe's exp is glibc's expf (evaluated in
    # double, rounded once); numpy's float32 exp is an ulp off it for about half of these inputs
    "exp_ulp_under_log": (_input(2, 32) +
                          'layer { name: "exp" type: "Exp" bottom: "data" top: "e" }\n'
                          'layer { name: "shift" type: "Power" bottom: "e" top: "s" power_param { shift: 0.1541 } }\n'
                          'layer { name: "log" type: "Log" bottom: "s" top: "s" log_param { base: 2 } }\n',
                          {"data": (np.float32(-0.16683444) + np.arange(-32, 32, dtype=np.float32)
                                    * np.float32(3e-7)).reshape(2, 32)}),
    # an LSTM's unrolled net reads the diff memory its top had at the LSTM's Reshape; the Flatten
    # above points that top at the Flatten's own diff only in its backward, so in the first
    # backward the LSTM reads its top's former (zero) diff: every diff below it is zero
    "lstm_under_flatten": (_input(2, 3, 5) + _input(2, 3, name="cont") +
                           'layer { name: "lstm" type: "LSTM" bottom: "data" bottom: "cont" top: "h" '
                           'recurrent_param { num_output: 4 weight_filler { type: "uniform" min: -0.5 max: 0.5 } '
                           '} }\n'
                           'layer { name: "f" type: "Flatten" bottom: "h" top: "f" flatten_param { axis: 0 '
                           'end_axis: 0 } }\n',
                           {"data": (2, 3, 5), "cont": np.array([[0, 0, 0], [1, 1, 0]], np.float32)}),
    # an RNN of one step: Caffe's output Concat has one bottom, so the output shares o_1's data and
    # the Scale working in place on it changes what o_1's TanH backward reads
    "rnn_one_step_in_place": (_input(1, 3, 4) + _input(1, 3, name="cont") + _RNN_SCALED, {
        "data": (1, 3, 4), "cont": np.zeros((1, 3), np.float32)}),
    # two steps: the Concat copies, so the TanH backward reads the values before the Scale
    "rnn_two_steps_in_place": (_input(2, 3, 4) + _input(2, 3, name="cont") + _RNN_SCALED, {
        "data": (2, 3, 4), "cont": np.array([[0, 0, 0], [1, 1, 1]], np.float32)}),
    # Resize's output summed as the fork's BiLinearResizeMat_cpu does (products of weights first, then
    # term by term): a separable product is an ulp off, enough for the MAX above to pick another of
    # the equal-looking values (a 1x1 map pooled with padding, then resized, is flat)
    "resize_flat_then_max": (_input(1, 5, 1, 1) +
                             'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: MAX '
                             'kernel_h: 4 kernel_w: 2 stride: 1 pad_h: 2 pad_w: 1 } }\n'
                             'layer { name: "r" type: "Resize" bottom: "p" top: "r" resize_param { height: 1 '
                             'width: 10 } }\n'
                             'layer { name: "s" type: "SPP" bottom: "r" top: "s" spp_param { pyramid_height: 1 '
                             'pool: MAX } }\n',
                             {"data": np.float32([0.4635898768901825, 1.8126277923583984, -0.659633994102478,
                                                  0.597612202167511, 1.321533441543579]).reshape(1, 5, 1, 1)}),
}

# nets whose exact gradient is zero somewhere, so that Caffe and the executor agree only up to the
# rounding of a cancelled sum: every disagreement must be excused by ``cancelled_noise``
NOISY = {
    # a SUM reduction gives BatchNormKyle's top a diff constant per channel: its alpha's diff
    # sum(x_norm * dy) is zero, as batch statistics centre x_norm, and both return rounding noise
    "kyle_alpha_cancelled": (_input(3, 4, 4, 4) +
                             'layer { name: "bn" type: "BatchNormKyle" bottom: "data" top: "bn" '
                             'batch_norm_param { use_global_stats: false use_alpha_beta: true } }\n'
                             'layer { name: "r" type: "Reshape" bottom: "bn" top: "r" '
                             'reshape_param { shape { dim: 192 dim: 1 } } }\n'
                             'layer { name: "sum" type: "Reduction" bottom: "r" top: "sum" '
                             'reduction_param { operation: SUM coeff: -1.5 } }\n', {"data": (3, 4, 4, 4)}),
}

# nets Caffe cannot back-propagate (it aborts): the executor must refuse them with a GraphError
REFUSED = {
    # a mask top rewritten to -1 (here every index; in the sweep an in-place MVN gave values in
    # (-2, -1]): the first plane's diffs land just before Caffe's diff buffer, on the malloc
    # chunk's size field, and glibc aborts when the blob is freed
    "pool_mask_minus_one": (_input(2, 2, 5, 6) +
                            'layer { name: "p" type: "Pooling" bottom: "data" top: "p" top: "m" '
                            'pooling_param { pool: MAX kernel_size: 2 stride: 1 } }\n'
                            'layer { name: "m1" type: "Power" bottom: "m" top: "m" '
                            'power_param { scale: 0 shift: -1 } }\n', {"data": (2, 2, 5, 6)}),
}


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("backward_pinned")
    rng = np.random.default_rng(11)
    cases = []
    for name, (body, inputs) in {**CASES, **NOISY, **REFUSED}.items():
        # an input is a shape (random values) or the array itself
        arrays = {k: s.astype(np.float32) if isinstance(s, np.ndarray) else rng.standard_normal(s).astype(np.float32)
                  for k, s in inputs.items()}
        cases.append((name, f'name: "{name}"\nforce_backward: true\n' + body, arrays, "TEST"))
    return workdir, run_in_caffe(workdir, cases, seed=5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pinned_backward_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert results[case]["status"] == "ok", results[case]["log"]
    ref = caffe_grads(workdir, case)
    ours = executor_grads(workdir, case, phase="TEST")
    assert grad_problems(ref, ours) == []


@pytest.mark.parametrize("case", sorted(NOISY))
def test_pinned_backward_cancelled_noise(caffe_results, case):
    workdir, results = caffe_results
    assert results[case]["status"] == "ok", results[case]["log"]
    ref = caffe_grads(workdir, case)
    ours = executor_grads(workdir, case, phase="TEST")
    problems = grad_problems(ref, ours)
    assert not problems or cancelled_noise(NOISY[case][0], ref, ours, problems), problems


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_pinned_backward_refused_like_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert results[case]["status"] == "refused", "Caffe back-propagated it"
    with pytest.raises(GraphError):
        executor_grads(workdir, case, phase="TEST")
