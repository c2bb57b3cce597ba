"""Activation layers against per-element reference formulas (Caffe's Forward_cpu, in float64)."""

import math

import numpy as np
import pytest
from google.protobuf import text_format

from tests.runtime.layer_harness import make_layer as harness_make, run_layer as harness_run
from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import TEST, TRAIN, Net
from amct_caffe.runtime.layers import activation
from amct_caffe.runtime.registry import known_types

RNG = np.random.default_rng(7)


def run_layer(text, bottoms, blobs=(), phase=TEST):
    layer = harness_make(text, len(bottoms), blobs, phase)
    return harness_run(layer, bottoms)[0][0], layer


def elementwise(f, x):
    return np.vectorize(lambda v: f(float(v)), otypes=[np.float64])(x)


def data(*shape, scale=3.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def check(got, want, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol)


def test_every_type_has_a_reference_function_named_after_it():
    for t in ["ReLU", "ReLU6", "PReLU", "Sigmoid", "TanH", "HardSigmoid", "HardSwish", "Swish", "Power",
              "AbsVal", "BNLL", "ELU", "Exp", "Log", "Threshold", "Clip", "Dropout"]:
        assert t in known_types()
        assert callable(getattr(activation, t))


@pytest.mark.parametrize("slope", [0.0, 0.1, 1.0, 1.5, -0.2])
def test_relu(slope):
    x = data(2, 3, 4, 5)
    x[0, 0, 0, :3] = 0
    y, _ = run_layer(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}', [x])
    check(y, elementwise(lambda v: max(v, 0) + slope * min(v, 0), x))


@pytest.mark.parametrize("slope,threshold", [(0.0, 6.0), (0.1, 6.0), (0.0, 2.5)])
def test_relu6(slope, threshold):
    x = data(3, 7) * 3
    y, _ = run_layer(f'type: "ReLU6" relu6_param {{ negative_slope: {slope} threshold: {threshold} }}', [x])
    check(y, elementwise(lambda v: min(max(v, 0) + slope * min(v, 0), threshold), x))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 3), (2, 3, 5)])
def test_prelu(shared, shape):
    x = data(*shape)
    c = shape[1]
    slopes = np.array([0.25], np.float32) if shared else np.array([0.25, -0.5, 1.7][:c], np.float32)
    blob = slopes.reshape(()) if shared else slopes
    y, _ = run_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}', [x], [blob])
    want = np.empty(shape)
    for idx in np.ndindex(*shape):
        a = slopes[0] if shared else slopes[idx[1]]
        want[idx] = max(x[idx], 0) + a * min(x[idx], 0)
    check(y, want)


def _net(layer_text, shape):
    dims = " ".join(f"dim: {d}" for d in shape)
    text = (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "l" bottom: "x" top: "y" {layer_text} }}')
    return Net(text_format.Parse(text, caffe_pb().NetParameter()), phase=TEST)


def test_prelu_blobs_and_default_filler():
    net = _net('type: "PReLU"', (1, 3, 2, 2))
    assert net.params["l"][0].data.shape == (3,)
    np.testing.assert_array_equal(net.params["l"][0].data, 0.25)  # Caffe's default filler
    shared = _net('type: "PReLU" prelu_param { channel_shared: true filler { type: "constant" value: 0.1 } }',
                  (1, 3, 2, 2))
    assert shared.layers[1].param_shapes([(1, 3, 2, 2)]) == [()]  # Caffe's 0-axis blob
    assert shared.params["l"][0].data.size == 1
    np.testing.assert_allclose(shared.params["l"][0].data, 0.1)
    x = -np.ones((1, 3, 2, 2), np.float32)
    np.testing.assert_allclose(shared.forward(x=x)["y"], -0.1, rtol=1e-6)


def test_prelu_wrong_slope_count():
    with pytest.raises(GraphError, match="slopes"):
        run_layer('type: "PReLU"', [data(2, 3, 2, 2)], [np.ones(4, np.float32)])


@pytest.mark.parametrize("text,ref", [
    ('type: "Sigmoid"', lambda v: 1 / (1 + math.exp(-v))),
    ('type: "TanH"', math.tanh),
    ('type: "AbsVal"', abs),
    ('type: "BNLL"', lambda v: v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v))),
    ('type: "ELU"', lambda v: max(v, 0) + (math.exp(min(v, 0)) - 1)),
    ('type: "ELU" elu_param { alpha: 0.3 }', lambda v: max(v, 0) + 0.3 * (math.exp(min(v, 0)) - 1)),
    ('type: "HardSigmoid"', lambda v: max(0.0, min(1.0, 0.2 * v + 0.5))),
    ('type: "HardSigmoid" hardsigmoid_param { alpha: 0.5 beta: 0.1 }',
     lambda v: max(0.0, min(1.0, 0.5 * v + 0.1))),
    ('type: "HardSwish"', lambda v: v * max(0.0, min(1.0, v / 6 + 0.5))),
    ('type: "Swish"', lambda v: v / (1 + math.exp(-v))),
    ('type: "Threshold"', lambda v: 1.0 if v > 0 else 0.0),
    ('type: "Threshold" threshold_param { threshold: 0.5 }', lambda v: 1.0 if v > 0.5 else 0.0),
])
def test_parameter_light_activations(text, ref):
    x = data(2, 3, 4, 4)
    x[0, 0, 0, :4] = [0.0, 0.5, -3.0, 3.0]  # thresholds and kinks
    y, _ = run_layer(text, [x])
    check(y, elementwise(ref, x))


def test_saturating_inputs_are_quiet_and_finite():
    x = np.array([-1000, -100, -20, 0, 20, 100, 1000], np.float32)
    for t in ("Sigmoid", "TanH", "BNLL", "ELU", "Swish", "HardSwish"):
        y, _ = run_layer(f'type: "{t}"', [x])  # pytest turns numpy warnings into errors
        assert np.isfinite(y).all(), t
    y, _ = run_layer('type: "Sigmoid"', [x])
    np.testing.assert_array_equal(y[[0, -1]], [0, 1])


def test_swish_beta():
    if "swish_param" not in caffe_pb().LayerParameter.DESCRIPTOR.fields_by_name:
        y = activation.Swish(np.array([1.5], np.float32), beta=2.0)
    else:
        y, _ = run_layer('type: "Swish" swish_param { beta: 2.0 }', [np.array([1.5], np.float32)])
    check(y, [1.5 / (1 + math.exp(-3.0))])


@pytest.mark.parametrize("power,scale,shift", [
    (1.0, 1.0, 0.0), (2.0, 1.0, 0.0), (2.0, 0.5, 1.0), (0.5, 2.0, 10.0), (-1.0, 1.0, 20.0), (3.0, -1.5, 0.3),
    (1.0, 2.0, -1.0), (1.0, 1.0, 4.0),
])
def test_power(power, scale, shift):
    x = data(2, 3, 5)
    y, _ = run_layer(f'type: "Power" power_param {{ power: {power} scale: {scale} shift: {shift} }}', [x])
    check(y, elementwise(lambda v: (shift + scale * v) ** power, x), rtol=1e-5)


def test_power_ignores_input_when_power_or_scale_is_zero():
    x = data(2, 3)
    y, _ = run_layer('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', [x])
    np.testing.assert_array_equal(y, 1)
    y, _ = run_layer('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', [x])
    np.testing.assert_array_equal(y, 8)


def test_power_of_negative_base_is_nan_quietly():
    y, _ = run_layer('type: "Power" power_param { power: 0.5 }', [np.array([-4.0, 4.0], np.float32)])
    assert np.isnan(y[0]) and y[1] == 2


@pytest.mark.parametrize("base,scale,shift",
                         [(-1, 1, 0), (-1, 0.5, 1), (2, 1, 0), (10, -0.3, 0.5), (0.5, 2, -1)])
def test_exp(base, scale, shift):
    x = data(3, 4, scale=1.0)
    y, _ = run_layer(f'type: "Exp" exp_param {{ base: {base} scale: {scale} shift: {shift} }}', [x])
    b = math.e if base == -1 else base
    check(y, elementwise(lambda v: b ** (shift + scale * v), x), rtol=1e-5)


@pytest.mark.parametrize("base,scale,shift", [(-1, 1, 0), (-1, 2, 1), (2, 1, 0), (10, 0.5, 3), (0.5, 1, 4)])
def test_log(base, scale, shift):
    x = np.abs(data(3, 4)) + 0.1
    y, _ = run_layer(f'type: "Log" log_param {{ base: {base} scale: {scale} shift: {shift} }}', [x])
    b = math.e if base == -1 else base
    check(y, elementwise(lambda v: math.log(shift + scale * v, b), x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text", ['type: "Exp" exp_param { base: 0 }', 'type: "Log" log_param { base: -2 }',
                                  'type: "Log" log_param { base: 1 }'])
def test_bad_bases_fail_at_construction(text):
    with pytest.raises(GraphError, match="base"):
        run_layer(text, [data(2, 2)])


def test_clip():
    x = data(4, 5)
    np.testing.assert_array_equal(activation.Clip(x, min=-1.0, max=2.0), np.minimum(np.maximum(x, -1), 2))
    np.testing.assert_array_equal(activation.Clip(x, min=1.0, max=-1.0), 1.0)  # Caffe: max(min, min(x, max))
    if "clip_param" in caffe_pb().LayerParameter.DESCRIPTOR.fields_by_name:
        y, _ = run_layer('type: "Clip" clip_param { min: -0.5 max: 0.5 }', [x])
        np.testing.assert_array_equal(y, np.clip(x, -0.5, 0.5))
        with pytest.raises(GraphError, match="min and max"):
            run_layer('type: "Clip" clip_param { min: -0.5 }', [x])
    else:
        with pytest.raises(GraphError, match="clip_param"):
            run_layer('type: "Clip"', [x])


def test_dropout_test_phase_is_identity():
    x = data(2, 3, 4)
    y, _ = run_layer('type: "Dropout" dropout_param { dropout_ratio: 0.7 }', [x])
    np.testing.assert_array_equal(y, x)
    y, _ = run_layer('type: "Dropout" dropout_param { dropout_ratio: 1.5 }', [x])  # Caffe does not check
    np.testing.assert_array_equal(y, x)
    with pytest.raises(GraphError, match="dropout_ratio"):
        run_layer('type: "Dropout" dropout_param { dropout_ratio: 1.5 }', [x], phase=TRAIN)


def test_dropout_without_scale_train_scales_at_test_time():
    x = np.abs(data(40, 50)) + 1
    np.testing.assert_allclose(activation.Dropout(x, 0.25, scale_train=False), x * 0.75, rtol=1e-6)
    y = activation.Dropout(x, 0.25, scale_train=False, train=True, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(y[y != 0], x[y != 0])


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_dropout_train_phase(ratio):
    x = np.abs(data(50, 40)) + 1
    text = f'name: "drop" type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}'
    y, _ = run_layer(text, [x], phase=TRAIN)
    kept = y != 0
    scale = np.float32(1.0 / (1.0 - np.float32(ratio)))
    np.testing.assert_array_equal(y[kept], x[kept] * scale)
    assert abs(kept.mean() - (1 - ratio)) < 0.05
    y2, _ = run_layer(text, [x], phase=TRAIN)
    np.testing.assert_array_equal(y, y2)  # masks are seeded by the layer name


@pytest.mark.parametrize("text", ['type: "ReLU" relu_param { negative_slope: -0.2 }', 'type: "ReLU"',
                                  'type: "ELU"', 'type: "Threshold"', 'type: "Power" power_param { power: 2 }'])
def test_zero_axis_blob(text):
    # A Reduction over axis 0 gives a 0-axis blob; Caffe's neuron layers run on its one value.
    layer = harness_make(f'name: "n" {text}', num_bottoms=1)
    x = np.array(-1.5, np.float32)
    (y,), _ = harness_run(layer, [x])
    assert y.shape == ()
    (ref,), _ = harness_run(layer, [x.reshape(1)])
    assert y == ref[0]


def test_absval_refuses_in_place():
    # absval_layer.cpp LayerSetUp: CHECK_NE(top[0], bottom[0]) "AbsVal Layer does not allow in-place"
    with pytest.raises(GraphError, match="'a'.*in-place"):
        harness_make('name: "a" type: "AbsVal" bottom: "x" top: "x"', num_bottoms=1)
    harness_make('name: "a" type: "AbsVal" bottom: "x" top: "y"', num_bottoms=1)


def test_prelu_refuses_more_than_4_axes():
    # prelu_layer.cpp reads bottom[0]->channels(); Blob's legacy accessors CHECK num_axes() <= 4
    with pytest.raises(GraphError, match="2 to 4 axes"):
        run_layer('type: "PReLU"', [data(2, 3, 2, 2, 1)], [np.ones(3, np.float32)])


def test_hardsigmoid_maps_nan_to_one_like_std_min():
    # max(0, min(1, a*x + b)) with std::min(Dtype(1), v) == (v < 1 ? v : 1): NaN gives 1
    y, _ = run_layer('type: "HardSigmoid"', [np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)])
    np.testing.assert_array_equal(y, [1.0, 1.0, 0.0, 0.5])
