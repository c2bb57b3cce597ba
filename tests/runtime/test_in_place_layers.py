"""Layers that Caffe runs in place (top == bottom) without computing their function: refused by name.

Caffe writes such a layer's top, which is its bottom, before it has read all of it (a Pooling fills its top with
-FLT_MAX or 0 first, an ACROSS_CHANNELS LRN multiplies scale^-beta by itself, a GEMM writes into the matrix it
reads), or it aborts (Slice) or breaks its memory (Concat). Measured against official Caffe when these layers were
added: every case below ran there (Slice aborted) with outputs unlike the layer's function, which the executor
computed, so the net now gets an error naming the layer. The forms Caffe runs correctly in place stay allowed.
"""

from __future__ import annotations

import pytest

from amct_caffe.errors import GraphError
from amct_caffe.runtime import TEST, Net

INPUT = 'layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
DIMS = "dim: 1 dim: 4 dim: 3 dim: 3"
REFUSED = {
    "LRN": 'type: "LRN" lrn_param { local_size: 3 }',
    "Pooling": 'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 }',
    "SPP": 'type: "SPP" spp_param { pyramid_height: 1 }',
    "Permute": 'type: "Permute" permute_param { order: 0 order: 1 order: 3 order: 2 }',
    "Convolution": 'type: "Convolution" convolution_param { num_output: 4 kernel_size: 1 }',
    "Deconvolution": 'type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 1 }',
    "InnerProduct": 'type: "InnerProduct" inner_product_param { num_output: 4 axis: 3 }',
    "Reduction": 'type: "Reduction" reduction_param { axis: 2 }',
}
ALLOWED = {
    "LRN WITHIN_CHANNEL": 'type: "LRN" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }',
    "Permute (no axis moves)": 'type: "Permute" permute_param { order: 0 order: 1 }',
    "ReLU": 'type: "ReLU"',
}


def _net(tmp_path, layer: str, bottoms=("x",), tops=("x",), extra: str = "") -> str:
    path = tmp_path / "net.prototxt"
    path.write_text(INPUT.format(dims=DIMS) + extra + 'layer { name: "l" ' + layer + " "
                    + " ".join(f'bottom: "{b}"' for b in bottoms) + " " + " ".join(f'top: "{t}"' for t in tops)
                    + " }\n")
    return str(path)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_a_layer_caffe_cannot_run_in_place_is_refused(tmp_path, kind):
    with pytest.raises(GraphError, match=rf"layer 'l' \({kind}\) works in place \(top == bottom\), where Caffe's "
                                         r".*; give it a top of its own"):
        Net(_net(tmp_path, REFUSED[kind]), TEST)


@pytest.mark.parametrize("kind", sorted(ALLOWED))
def test_the_forms_caffe_runs_in_place_still_run(tmp_path, kind):
    Net(_net(tmp_path, ALLOWED[kind]), TEST).forward()


def test_concat_and_slice_in_place_only_with_one_blob_joined_or_split(tmp_path):
    extra = INPUT.format(dims=DIMS).replace('"x"', '"y"')
    with pytest.raises(GraphError, match=r"\(Concat\) works in place .* resizes its first input"):
        Net(_net(tmp_path, 'type: "Concat"', ("x", "y"), ("x",), extra), TEST)
    with pytest.raises(GraphError, match=r"\(Slice\) works in place .* refuses to reshape its input"):
        Net(_net(tmp_path, 'type: "Slice" slice_param { axis: 1 }', ("x",), ("x", "z")), TEST)
    Net(_net(tmp_path, 'type: "Concat"'), TEST).forward()  # one bottom: Caffe shares it


def test_crop_and_resize_in_place_only_where_the_shape_stays(tmp_path):
    """Caffe's in-place Crop to a smaller shape aborts (it reshapes its input, then reads past it); a Resize that
    changes the size alike. Where the shape stays they run (their backward: tests/training/test_backward_net.py)."""
    ref = INPUT.format(dims="dim: 1 dim: 4 dim: 2 dim: 2").replace('"x"', '"r"')
    with pytest.raises(GraphError, match=r"\(Crop\): works in place \(top == bottom\) while cropping \[1, 4, 3, 3\]"):
        Net(_net(tmp_path, 'type: "Crop" crop_param { axis: 2 }', ("x", "r"), ("x",), ref), TEST)
    with pytest.raises(GraphError, match=r"\(Resize\) works in place \(top == bottom\) while resizing \[3, 3\]"):
        Net(_net(tmp_path, 'type: "Resize" resize_param { height: 5 width: 5 }'), TEST)
    Net(_net(tmp_path, 'type: "Resize" resize_param { height: 3 width: 3 }'), TEST).forward()
