"""Shape layers against loop references transcribed from the Caffe sources, and on golden blobs."""

import itertools

import numpy as np
import pytest

from tests.runtime.layer_harness import make_layer, run_layer
from amct_caffe.errors import GraphError
from amct_caffe.runtime.layers import reduction
from amct_caffe.runtime.registry import layer_class
from tests.golden import CASES_BY_NAME, compare

RNG = np.random.default_rng(7)


make = make_layer


def run(text, *bottoms):
    return run_layer(make(text), bottoms)[0]


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------ Concat / Slice / Split
@pytest.mark.parametrize("axis, param", [(1, ""), (0, "axis: 0"), (2, "axis: -1"), (0, "concat_dim: 0")])
def test_concat_axes(axis, param):
    shapes = [(2, 3, 4), (2, 3, 4), (2, 3, 4)]
    xs = []
    for k in range(3):
        s = list(shapes[k])
        s[axis] = k + 1
        xs.append(rand(*s))
    (y,) = run(f'type: "Concat" bottom: "a" bottom: "b" bottom: "c" top: "y" concat_param {{ {param} }}', *xs)
    pos = 0
    for x in xs:  # each bottom lands in its own band of the concat axis
        idx = [slice(None)] * 3
        idx[axis] = slice(pos, pos + x.shape[axis])
        np.testing.assert_array_equal(y[tuple(idx)], x)
        pos += x.shape[axis]


def test_concat_errors_and_single_bottom():
    with pytest.raises(GraphError, match="either axis or concat_dim"):
        run('type: "Concat" bottom: "a" bottom: "b" top: "y" concat_param { axis: 1 concat_dim: 1 }',
            rand(1, 2), rand(1, 2))
    with pytest.raises(GraphError, match="differ off axis"):
        run('type: "Concat" bottom: "a" bottom: "b" top: "y"', rand(1, 2, 3), rand(1, 2, 4))
    x = rand(2, 3)
    assert run('type: "Concat" bottom: "a" top: "y"', x)[0] is x


@pytest.mark.parametrize("param, sizes, axis", [
    ("slice_point: 1 slice_point: 4", [1, 3, 2], 1),
    ("axis: -1 slice_point: 2", [2, 4], 2),
    ("slice_dim: 0", [1, 1], 0),
    ("", [3, 3], 1),  # no points: equal parts
])
def test_slice(param, sizes, axis):
    shape = [2, 6, 6]
    x = rand(*shape)
    tops = " ".join(f'top: "t{i}"' for i in range(len(sizes)))
    outs = run(f'type: "Slice" bottom: "x" {tops} slice_param {{ {param} }}', x)
    assert [o.shape[axis] for o in outs] == sizes
    np.testing.assert_array_equal(np.concatenate(outs, axis=axis), x)


def test_slice_errors():
    with pytest.raises(GraphError, match="divide"):
        run('type: "Slice" bottom: "x" top: "a" top: "b"', rand(1, 3))
    with pytest.raises(GraphError, match="increase strictly"):
        run('type: "Slice" bottom: "x" top: "a" top: "b" top: "c" '
            "slice_param { slice_point: 2 slice_point: 2 }",
            rand(1, 4))


def test_split_shares_and_refuses_in_place():
    x = rand(2, 3)
    outs = run('type: "Split" bottom: "x" top: "a" top: "b" top: "c"', x)
    assert len(outs) == 3 and all(o is x for o in outs)
    with pytest.raises(GraphError, match="in-place"):
        make('type: "Split" bottom: "x" top: "x"')


# ------------------------------------------------------------------------ Flatten / Reshape / Unsqueeze
@pytest.mark.parametrize("param, want", [("", (2, 60)), ("axis: 2", (2, 3, 20)),
                                         ("axis: 1 end_axis: 2", (2, 12, 5)),
                                         ("axis: 0 end_axis: -2", (24, 5)), ("axis: -1", (2, 3, 4, 5))])
def test_flatten(param, want):
    x = rand(2, 3, 4, 5)
    (y,) = run(f'type: "Flatten" bottom: "x" top: "y" flatten_param {{ {param} }}', x)
    assert y.shape == want
    np.testing.assert_array_equal(y.ravel(), x.ravel())


@pytest.mark.parametrize("param, bottom, want", [
    # the examples of caffe.proto's ReshapeParameter comment
    ("shape { dim: 2 dim: 2 dim: 4 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 0 dim: 2 dim: 4 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 0 dim: 2 dim: -1 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 0 dim: -1 dim: 4 }", (2, 8), (2, 2, 4)),
    ("shape { dim: 2 dim: 4 } axis: 1", (2, 8), (2, 2, 4)),
    ("shape { dim: 2 dim: 4 } axis: -2", (2, 8), (2, 2, 4)),  # the comment says -3; the code needs -2
    ("shape { dim: 1 dim: 2 } num_axes: 1", (2, 8), (1, 2, 8)),
    ("shape { dim: 1 } num_axes: 0", (2, 8), (1, 2, 8)),
    ("shape { dim: 1 } axis: 1 num_axes: 0", (2, 8), (2, 1, 8)),
    ("shape { dim: -1 } axis: -1", (2, 8), (2, 8, 1)),
    ("shape { dim: 0 dim: -1 dim: 2 }", (3, 4, 5, 2), (3, 20, 2)),
])
def test_reshape(param, bottom, want):
    x = rand(*bottom)
    (y,) = run(f'type: "Reshape" bottom: "x" top: "y" reshape_param {{ {param} }}', x)
    assert y.shape == want
    np.testing.assert_array_equal(y.ravel(), x.ravel())


@pytest.mark.parametrize("param, match", [
    ("shape { dim: -1 dim: -1 }", "at most one -1"),
    ("shape { dim: 3 dim: -1 }", "divisible"),
    ("shape { dim: 0 dim: 0 dim: 0 }", "no bottom axis"),
    ("shape { dim: 5 }", "cannot reshape"),
])
def test_reshape_errors(param, match):
    with pytest.raises(GraphError, match=match):
        run(f'type: "Reshape" bottom: "x" top: "y" reshape_param {{ {param} }}', rand(2, 8))


@pytest.mark.parametrize("dim, want", [(0, (1, 2, 3)), (1, (2, 1, 3)), (2, (2, 3, 1)), (-1, (2, 3, 1)),
                                       (-3, (1, 2, 3))])
def test_unsqueeze(dim, want):
    x = rand(2, 3)
    (y,) = run(f'type: "Unsqueeze" bottom: "x" top: "y" unsqueeze_param {{ dim: {dim} }}', x)
    assert y.shape == want
    np.testing.assert_array_equal(y.ravel(), x.ravel())


# ------------------------------------------------------------------------ Permute
def permute_reference(x, orders):
    """permute_layer.cpp's Permute(): index arithmetic with old/new steps, element by element."""
    n = x.ndim
    order = list(orders) + [i for i in range(n) if i not in orders]
    top_shape = [x.shape[o] for o in order]
    old_steps = [int(np.prod(x.shape[i + 1:])) for i in range(n)]
    new_steps = [int(np.prod(top_shape[i + 1:])) for i in range(n)]
    src, out = x.ravel(), np.empty(int(np.prod(top_shape)), np.float32)
    for i in range(out.size):
        old_idx, idx = 0, i
        for j in range(n):
            old_idx += (idx // new_steps[j]) * old_steps[order[j]]
            idx %= new_steps[j]
        out[i] = src[old_idx]
    return out.reshape(top_shape)


@pytest.mark.parametrize("order", [(0, 2, 3, 1), (0, 2), (3, 2, 1, 0), (1,), (0, 1, 2, 3)])
def test_permute(order):
    x = rand(2, 3, 4, 5)
    param = " ".join(f"order: {o}" for o in order)
    (y,) = run(f'type: "Permute" bottom: "x" top: "y" permute_param {{ {param} }}', x)
    np.testing.assert_array_equal(y, permute_reference(x, order))
    assert y.flags.c_contiguous


def test_permute_errors():
    for param in ("order: 4", "order: 1 order: 1"):
        with pytest.raises(GraphError):
            run(f'type: "Permute" bottom: "x" top: "y" permute_param {{ {param} }}', rand(1, 2, 3, 4))


# ------------------------------------------------------------------ Crop / Tile / Reverse / BatchReindex
@pytest.mark.parametrize("param, start", [("", (0, 0, 0, 0)), ("offset: 1", (0, 0, 1, 1)),
                                          ("axis: 1 offset: 1 offset: 2 offset: 0", (0, 1, 2, 0)),
                                          ("axis: -1 offset: 3", (0, 0, 0, 3))])
def test_crop(param, start):
    x, ref = rand(2, 5, 6, 7), np.zeros((2, 3, 4, 4), np.float32)
    (y,) = run(f'type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param {{ {param} }}', x, ref)
    axis = {"": 2, "offset: 1": 2}.get(param, 1 if "axis: 1" in param else 3)
    want_shape = x.shape[:axis] + ref.shape[axis:]
    assert y.shape == want_shape
    for idx in itertools.product(*(range(d) for d in want_shape)):
        assert y[idx] == x[tuple(i + s for i, s in zip(idx, start, strict=True))]


def test_crop_out_of_bounds():
    with pytest.raises(GraphError, match="out of bounds"):
        run('type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { offset: 3 }',
            rand(1, 1, 5, 5), np.zeros((1, 1, 3, 3), np.float32))


@pytest.mark.parametrize("axis, tiles", [(1, 3), (0, 2), (-1, 2), (2, 1)])
def test_tile(axis, tiles):
    x = rand(2, 3, 4)
    (y,) = run(f'type: "Tile" bottom: "x" top: "y" tile_param {{ axis: {axis} tiles: {tiles} }}', x)
    a = axis % 3
    outer, inner = int(np.prod(x.shape[:a])), int(np.prod(x.shape[a:]))
    flat, want = x.ravel(), []
    for i in range(outer):  # tile_layer.cpp: each outer block copied `tiles` times
        for _ in range(tiles):
            want.extend(flat[i * inner:(i + 1) * inner])
    np.testing.assert_array_equal(y.ravel(), want)
    with pytest.raises(GraphError, match="tiles"):
        run('type: "Tile" bottom: "x" top: "y"', x)


def test_reverse_and_batch_reindex():
    x = rand(3, 4, 5)
    (y,) = run('type: "Reverse" bottom: "x" top: "y" reverse_param { axis: 0 axis: -1 }', x)
    np.testing.assert_array_equal(y, x[::-1, :, ::-1])
    (y,) = run('type: "BatchReindex" bottom: "x" bottom: "i" top: "y"', x, np.array([2, 0, 2, 1], np.float32))
    np.testing.assert_array_equal(y, x[[2, 0, 2, 1]])
    with pytest.raises(GraphError, match="outside"):
        run('type: "BatchReindex" bottom: "x" bottom: "i" top: "y"', x, np.array([3], np.float32))


# ------------------------------------------------------------------------ Reduction / ArgMax
@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis, coeff", [(0, 1.0), (1, 2.5), (-1, -0.5), (2, 1.0)])
def test_reduction(op, axis, coeff):
    x = rand(2, 3, 4)
    (y,) = run(f'type: "Reduction" bottom: "x" top: "y" reduction_param {{ operation: {op} axis: {axis} '
               f"coeff: {coeff} }}", x)
    a = axis % 3
    assert y.shape == x.shape[:a]
    rows = x.reshape(int(np.prod(x.shape[:a])), -1).astype(np.float64)
    for i, row in enumerate(rows):
        v = {"SUM": row.sum(), "ASUM": np.abs(row).sum(), "SUMSQ": (row * row).sum(), "MEAN": row.mean()}[op]
        assert y.ravel()[i] == pytest.approx(v * coeff, rel=1e-6, abs=1e-6)


def argmax_reference(x, out_max_val, top_k, axis):
    """argmax_layer.cpp, literally: (value, index) pairs sorted with std::greater."""
    if axis is None:
        dim, axis_dist = int(np.prod(x.shape[1:])), 1
    else:
        dim, axis_dist = x.shape[axis], int(np.prod(x.shape[axis:])) // x.shape[axis]
    num, data = x.size // dim, x.ravel()
    shape = reduction.argmax_shape(x.shape, out_max_val, top_k, axis)
    out = np.zeros(int(np.prod(shape)), np.float32)
    for i in range(num):
        pairs = [(data[(i // axis_dist * dim + j) * axis_dist + i % axis_dist], j) for j in range(dim)]
        pairs.sort(reverse=True)
        for j in range(top_k):
            at = (i // axis_dist * top_k + j) * axis_dist + i % axis_dist
            if out_max_val and axis is None:
                out[2 * i * top_k + j], out[2 * i * top_k + top_k + j] = pairs[j][1], pairs[j][0]
            else:
                out[at] = pairs[j][0] if out_max_val else pairs[j][1]
    return out.reshape(shape)


@pytest.mark.parametrize("out_max_val", [False, True])
@pytest.mark.parametrize("top_k, axis", [(1, None), (3, None), (1, 1), (2, 1), (2, -1), (2, 0)])
def test_argmax(out_max_val, top_k, axis):
    x = RNG.integers(0, 4, (3, 4, 5)).astype(np.float32)  # many ties: the higher index ranks first
    param = f"out_max_val: {str(out_max_val).lower()} top_k: {top_k}"
    param += "" if axis is None else f" axis: {axis}"
    (y,) = run(f'type: "ArgMax" bottom: "x" top: "y" argmax_param {{ {param} }}', x)
    want = argmax_reference(x, out_max_val, top_k, None if axis is None else axis % 3)
    np.testing.assert_array_equal(y, want)


def test_argmax_layout_without_axis():
    (y,) = run('type: "ArgMax" bottom: "x" top: "y" argmax_param { out_max_val: true top_k: 2 }',
               np.array([[1, 5, 3], [7, 0, 7]], np.float32))
    np.testing.assert_array_equal(y, [[[1, 2], [5, 3]], [[2, 0], [7, 7]]])  # ties: higher index first
    assert y.shape == (2, 2, 2)


def test_silence():
    layer = make('type: "Silence" bottom: "a" bottom: "b"')
    assert layer.reshape([(1, 2), (3,)]) == [] and layer.forward([rand(1, 2), rand(3)]) == []


# ------------------------------------------------------------------------ ShuffleChannel / Reorg
@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_shuffle_channel(group):
    x = rand(2, 6, 3, 2)
    (y,) = run(f'type: "ShuffleChannel" bottom: "x" top: "y" shuffle_channel_param {{ group: {group} }}', x)
    cols = 6 // group
    for i in range(group):
        for j in range(cols):  # ShuffleChannel's Resize_cpu: out[j*g + i] = in[i*cols + j]
            np.testing.assert_array_equal(y[:, j * group + i], x[:, i * cols + j])
    with pytest.raises(GraphError, match="divide"):
        run('type: "ShuffleChannel" bottom: "x" top: "y" shuffle_channel_param { group: 4 }', x)


def reorg_reference(x, stride, forward):
    """Caffe-YOLO's reorg_cpu(bottom, w, h, c, n, stride, forward, top), loops as written."""
    n, c, h, w = x.shape
    tc, tw, th = c // stride ** 2, w * stride, h * stride
    src, out = x.ravel(), np.empty(x.size, np.float32)
    for b, k, j, i in itertools.product(range(n), range(c), range(h), range(w)):
        bottom_index = i + w * (j + h * (k + c * b))
        off = k // tc
        top_index = (i * stride + off % stride) + tw * ((j * stride + off // stride) + th * (k % tc + tc * b))
        if forward:
            out[top_index] = src[bottom_index]
        else:
            out[bottom_index] = src[top_index]
    return out


@pytest.mark.parametrize("stride, reverse, shape", [(2, False, (2, 8, 4, 6)), (2, True, (2, 8, 3, 2)),
                                                    (3, False, (1, 9, 3, 6)), (1, False, (1, 2, 3, 3))])
def test_reorg(stride, reverse, shape):
    x = rand(*shape)
    (y,) = run(f'type: "Reorg" bottom: "x" top: "y" '
               f"reorg_param {{ stride: {stride} reverse: {str(reverse).lower()} }}", x)
    n, c, h, w = shape
    s2 = stride * stride
    want = (n, c // s2, h * stride, w * stride) if reverse else (n, c * s2, h // stride, w // stride)
    assert y.shape == want
    # the layer calls reorg_cpu with forward = reverse
    np.testing.assert_array_equal(y.ravel(), reorg_reference(x, stride, reverse))


def test_reorg_errors():
    with pytest.raises(GraphError, match="stride"):
        run('type: "Reorg" bottom: "x" top: "y" reorg_param { stride: 2 }', rand(1, 4, 3, 4))
    with pytest.raises(GraphError, match="in-place"):
        make('type: "Reorg" bottom: "x" top: "x"')


# ------------------------------------------------------------------------ golden blobs
def golden_layers(case, types):
    from amct_caffe import io

    c = CASES_BY_NAME[case]
    if not c.golden.exists() or not c.prototxt.exists():
        pytest.skip(f"{c.golden} missing")
    net, _ = io.load_model(str(c.prototxt), None, io.TEST)
    z = np.load(c.golden)
    return [lp for lp in net.layer if lp.type in types], z


@pytest.mark.parametrize("case, types", [
    ("mtcnn_det4", {"Slice", "Concat"}),
    ("hyperlpr_mininet_ssd", {"Permute", "Flatten", "Concat", "Reshape"}),
    ("ultraface_slim320", {"Permute", "Reshape", "Concat"}),
])
def test_golden_blobs(case, types):
    layers, z = golden_layers(case, types)
    checked = 0
    for lp in layers:
        if any(f"blob:{b}" not in z.files for b in lp.bottom):
            continue
        layer = layer_class(lp.type, lp.name)(lp)
        bottoms = [z[f"blob:{b}"] for b in lp.bottom]
        layer.reshape([b.shape for b in bottoms])
        for name, top in zip(lp.top, layer.forward(bottoms), strict=True):
            err, allowed = compare(name, top, z)
            assert err == 0, f"{lp.name}: {err}"
            checked += 1
    assert checked >= 2
