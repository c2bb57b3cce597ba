"""Calibration data at its edges: 16-bit images, hand-written recorded batches, per-input folders, and the
--preprocess file's default resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from amct_caffe.data import DataError, ImageFolder, Preprocess, Record, open_source


def test_a_16_bit_gray_image_keeps_its_high_byte_as_opencv_reads_it(tmp_path):
    """Pillow's conversion clipped a 16-bit PNG to 255; OpenCV's imread (Caffe's reader) keeps value >> 8."""
    values = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "deep.png")
    for channels in (1, 3):
        src = ImageFolder(tmp_path, {"data": (1, channels, 8, 8)}, Preprocess())
        got = src.sample("data", 0)
        assert got.shape == (channels, 8, 8)
        np.testing.assert_array_equal(got[0], (values >> 8).astype(np.float32))


@pytest.mark.parametrize("array, fault", [
    (np.array([["1", "2"], ["3", "4"]]), "is not a numeric array"),
    (np.ones((2, 2), np.complex64), "holds complex values"),
])
def test_recorded_arrays_of_text_or_complex_values_are_refused(tmp_path, array, fault):
    with pytest.raises(DataError, match="must be a numeric array of samples"):
        Record(tmp_path / "rec").add(data=array)
    (tmp_path / "hand").mkdir()
    np.savez(tmp_path / "hand" / "batch_000000.npz", data=array)  # a file written by hand
    src = open_source(tmp_path / "hand", {"data": (2, 2)}, 2)
    with pytest.raises(DataError, match=rf"batch_000000.npz: the recorded array 'data' {fault}"):
        src.batch(0)


def test_per_input_folders_missing_one_are_refused(tmp_path):
    """Sub-folders for some inputs only (one misnamed): the images of the top folder went to every input."""
    for name in ("a", "B"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / "0.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "top.png")
    with pytest.raises(DataError, match=r"holds sub-folders for input\(s\) \['a'\] but none for \['b'\]"):
        ImageFolder(tmp_path, {"a": (1, 3, 4, 4), "b": (1, 3, 4, 4)})
    (tmp_path / "top.png").unlink()  # one input, a folder of sub-folders only: the message says why none is read
    with pytest.raises(DataError, match=r"holds no image .*its sub-folders \(B, a\) are read only as the per-input"):
        ImageFolder(tmp_path, {"x": (1, 3, 4, 4)})


@pytest.mark.usefixtures("cli_scratch_dir")
def test_a_preprocess_file_entry_without_geometry_resizes_to_the_input(tmp_path):
    """--preprocess {"data": {"scale": ...}} on 32x32 images for a 28x28 input: resized as with the flags."""
    import json

    from amct_caffe import cli
    from tests.test_cli import LENET, LENET_WEIGHTS

    (tmp_path / "img").mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "pp.json").write_text(json.dumps({"data": {"scale": 0.00390625}}))
    assert cli.main(["run", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--input", str(tmp_path / "img"),
                     "--preprocess", str(tmp_path / "pp.json"), "--batch-size", "2", "--no-progress"]) == 0


@pytest.mark.parametrize("channels", [2, 4])
def test_a_resize_of_2_or_4_channels_keeps_each_channel(channels):
    """Pillow takes 2 or 4 channels for LA / RGBA and weights the colours by the last as alpha: a constant
    [200, ..., 0] image came out all 0. Each channel is now resized on its own (a constant stays constant)."""
    hwc = np.zeros((8, 8, channels), np.uint8)
    hwc[:, :, :-1] = 200
    out = Preprocess(size=(4, 4)).resize(hwc)
    assert out.shape == (4, 4, channels)
    np.testing.assert_array_equal(out[0, 0], [200] * (channels - 1) + [0])
