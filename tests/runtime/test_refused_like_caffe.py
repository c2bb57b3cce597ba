"""Layer settings official Caffe aborts on (a CHECK in its setup) get the library's error naming the layer.

Each case was run in official Caffe when its check was added: Caffe aborted on every one; the executor had run
them (a gaussian of std 0 filled zeros, a PriorBox of step 0 put every box at the origin) or failed with a
NumPy or protobuf exception.
"""

from __future__ import annotations

import re

import pytest

from amct_caffe.errors import AmctError
from amct_caffe.runtime import TEST, TRAIN, Net

X = 'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'


def _conv(filler: str) -> str:
    return X + ('layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 2 '
                f'kernel_size: 3 weight_filler {{ {filler} }} }} }}\n')


@pytest.mark.parametrize("filler, message", [
    ('type: "gaussian" std: 0', r"the gaussian filler's std must be > 0, got 0"),
    ('type: "uniform" min: 1 max: -1', r"the uniform filler's min \(1.0\) must not exceed its max \(-1.0\)"),
    ('type: "xavier" sparse: 1', r"the xavier filler does not support sparse \(1\); only gaussian does"),
    ('type: "constant" sparse: 2', r"the constant filler does not support sparse"),
])
def test_filler_settings_caffe_refuses(tmp_path, filler, message):
    path = tmp_path / "net.prototxt"
    path.write_text(_conv(filler))
    with pytest.raises(AmctError, match=rf"layer 'c' \(Convolution\): {message}"):
        Net(str(path), TEST)


def test_a_sparse_gaussian_keeps_about_sparse_in_num_outputs_of_the_weights(tmp_path):
    """gaussian with sparse k keeps each weight with probability k / num_outputs (Caffe's bernoulli mask)."""
    path = tmp_path / "net.prototxt"
    path.write_text(X.replace("dim: 2 dim: 4 dim: 4", "dim: 400") +
                    'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: '
                    '50 weight_filler { type: "gaussian" std: 1 sparse: 10 } } }\n')
    w = Net(str(path), TEST, seed=3).params["ip"][0].data
    assert 0.17 < (w != 0).mean() < 0.23  # 10 / 50 of 20,000 weights


@pytest.mark.parametrize("fields, message", [
    ("step: 0", "step must be > 0, got 0"),
    ("img_size: 0", "img_size must be > 0, got 0"),
    # prior_box_layer.cpp checks img_h and img_w (step_h and step_w) both as soon as either is set: one
    # alone is refused there, where taking the other from the image would silently drop the one given
    ("img_h: 20", "img_h and img_w go together and must be > 0, got img_w unset"),
    ("img_w: 30", "img_h and img_w go together and must be > 0, got img_h unset"),
    ("img_h: 0 img_w: 30", "img_h and img_w go together and must be > 0, got img_h 0"),
    ("step_h: 3", "step_h and step_w go together and must be > 0, got step_w unset"),
    ("step_w: 5 step_h: -1", "step_h and step_w go together and must be > 0, got step_h -1"),
    ("img_size: 30 img_h: 20 img_w: 20", "give img_size or img_h/img_w, not both"),
])
def test_priorbox_image_size_and_step_settings_caffe_refuses_are_refused(tmp_path, fields, message):
    path = tmp_path / "net.prototxt"
    path.write_text(X + X.replace('"x"', '"img"') + 'layer { name: "p" type: "PriorBox" bottom: "x" bottom: "img" '
                    f'top: "p" prior_box_param {{ min_size: 2 {fields} }} }}\n')
    with pytest.raises(AmctError, match=r"layer 'p' \(PriorBox\): " + re.escape(message)):
        Net(str(path), TEST)


@pytest.mark.parametrize("content, message", [
    (None, r"cannot read layer 'l' \(InfogainLoss\) infogain matrix file .*: it does not exist"),
    (b"\xff\xff\xff", r"layer 'l' \(InfogainLoss\): infogain_loss_param.source .* is not a binaryproto BlobProto"),
])
def test_an_infogain_source_that_cannot_be_read_is_named(tmp_path, content, message):
    source = tmp_path / "H.binaryproto"
    if content is not None:
        source.write_bytes(content)
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "x" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } '
                    'shape { dim: 2 } } }\n'
                    f'layer {{ name: "l" type: "InfogainLoss" bottom: "x" bottom: "t" top: "loss" '
                    f'infogain_loss_param {{ source: "{source}" }} }}\n')
    with pytest.raises(AmctError, match=message):
        Net(str(path), TRAIN)


@pytest.mark.parametrize("layer, message", [
    ('type: "Reduction" reduction_param { operation: SUMSQ }', "out of range for a 0-D blob"),
    ('type: "Flatten" flatten_param { axis: 0 end_axis: 0 }', "out of range for a 0-D blob"),
    ('type: "Softmax" softmax_param { axis: 0 }', "out of range for a 0-D blob"),
    ('type: "Concat" concat_param { axis: 0 }', "out of range for a 0-D blob"),
    ('type: "ArgMax"', "a 0-D blob does not have"),
])
def test_a_layer_taking_an_axis_of_a_0d_blob_is_refused(tmp_path, layer, message):
    """A Reduction over every axis gives a 0-D blob; Caffe's CanonicalAxisIndex aborts on any axis of it
    ("axis 0 out of range for 0-D Blob"; checked in official Caffe for each case): the executor had taken axis
    0 of it as if it had one axis, and an ArgMax without an axis raised an IndexError."""
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                    'layer { name: "all" type: "Reduction" bottom: "x" top: "s" }\n'
                    f'layer {{ name: "again" {layer} bottom: "s" top: "t" }}\n')
    with pytest.raises(AmctError, match=rf"'again'.*{message}"):
        Net(str(path), TEST)


def test_a_net_too_large_for_memory_raises_the_librarys_error(tmp_path):
    """Under a 2.5 GB address-space limit, MTCNN P-Net at 8000 x 8000 (its conv1 top alone 2.4 GB): numpy's bare
    MemoryError reached API users (the command line alone said what to do); it is an OutOfMemoryError now, an
    AmctError and still a MemoryError."""
    import subprocess
    import sys

    from tests.golden import MODELS

    model = tmp_path / "det1_8000.prototxt"
    model.write_text((MODELS / "mtcnn" / "det1.prototxt").read_text().replace("input_dim: 12", "input_dim: 8000"))
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000))\n"
            "import amct_caffe as amct\n"
            "from amct_caffe.runtime import TEST, Net\n"
            "try:\n"
            f"    Net({str(model)!r}, {str(MODELS / 'mtcnn' / 'det1.caffemodel')!r}, TEST)\n"
            "except amct.OutOfMemoryError as e:\n"
            "    assert isinstance(e, amct.AmctError) and isinstance(e, MemoryError)\n"
            "    print(e)\n"
            "    sys.exit(0)\n"
            "sys.exit(3)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1", "AMCT_LOG_LEVEL": "ERROR"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"out of memory building the net of {model} (Unable to allocate"), res.stdout
    assert res.stdout.rstrip().endswith("use a smaller batch or input shape, or fewer / smaller inputs")


def test_two_layers_of_one_name_are_refused_naming_the_file(tmp_path):
    """Caffe runs a net whose two (parameter-free) layers share a name; the executor indexes layers by name and the
    quantization's config and record name them, so both refuse it, naming the model file (calibrate had named the
    graph, 'LeNet')."""
    import amct_caffe as amct
    from tests.test_cli import LENET, LENET_WEIGHTS

    model = tmp_path / "twice.prototxt"
    model.write_text(LENET.read_text().replace('name: "pool2"', 'name: "pool1"'))
    with pytest.raises(AmctError, match=rf"{re.escape(str(model))}: two layers are named 'pool1' \(Caffe runs it\): "
                                        "rename one"):
        Net(str(model), str(LENET_WEIGHTS), TEST)
    with pytest.raises(AmctError, match=rf"{re.escape(str(model))}: two layers are named 'pool1'; quantization names "
                                        "layers in its config and record"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(model), str(LENET_WEIGHTS))
