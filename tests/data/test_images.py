"""Image folders: order, shapes, and preprocessing numbers against NumPy computed by hand."""

import sys

import numpy as np
import pytest

from amct_caffe.data import DataError, ImageFolder, Preprocess
from amct_caffe.data.images import decode_image
from tests.data.common import IMAGENET, IMAGENET_MEAN, needs_imagenet

Image = pytest.importorskip("PIL.Image")

IMAGENET_INPUT = {"data": (1, 3, 224, 224)}


def _bgr_mean() -> tuple:
    """Per-channel BGR mean of the BVLC ImageNet mean image (as Caffe's classification example does)."""
    return tuple(np.load(IMAGENET_MEAN).mean(axis=(1, 2)))


def _write_png(path, arr):
    Image.fromarray(arr).save(path)


@needs_imagenet
def test_imagenet_order_shapes_and_selection():
    src = ImageFolder(IMAGENET, IMAGENET_INPUT, Preprocess(short_side=256, crop=224, mean=_bgr_mean()), 4)
    names = sorted(p.name for p in IMAGENET.iterdir())
    assert src.num_samples == 1000 and len(src) == 250
    assert [p.name for p in src.files()] == names
    batch = next(iter(src))
    assert list(batch) == ["data"]
    assert batch["data"].shape == (4, 3, 224, 224) and batch["data"].dtype == np.float32
    calib = src.select(step=10)  # the data README's calibration split: indices that are multiples of 10
    assert calib.num_samples == 100 and len(calib) == 25
    assert [p.name for p in calib.files()[:3]] == [names[0], names[10], names[20]]
    np.testing.assert_array_equal(next(iter(calib))["data"][1], src.batch(2)["data"][2])  # image 10
    held_out = src.select(1, None, 1)
    assert held_out.num_samples == 999


@needs_imagenet
def test_bgr_mean_crop_matches_numpy_on_one_image():
    """n01440764_tench is 341x256: short side 256 means no resize, so this is decode + NumPy only."""
    mean = _bgr_mean()
    src = ImageFolder(IMAGENET, IMAGENET_INPUT, Preprocess(short_side=256, crop=224, mean=mean), 1)
    assert src.files()[0].name == "n01440764_tench.JPEG"
    got = src.batch(0)["data"][0]

    rgb = np.asarray(Image.open(IMAGENET / "n01440764_tench.JPEG").convert("RGB")).astype(np.float64)
    h, w = rgb.shape[:2]
    assert (h, w) == (256, 341)
    top, left = (h - 224) // 2, (w - 224) // 2
    crop = rgb[top:top + 224, left:left + 224]
    want = crop[:, :, ::-1].transpose(2, 0, 1) - np.array(mean).reshape(3, 1, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@needs_imagenet
def test_rgb_std_scale_is_torchvision_normalize():
    m, s = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    spec = Preprocess(short_side=256, crop=224, channel_order="RGB", mean=tuple(255 * m), std=tuple(255 * s))
    got = ImageFolder(IMAGENET, IMAGENET_INPUT, spec).batch(0)["data"][0]
    rgb = np.asarray(Image.open(IMAGENET / "n01440764_tench.JPEG").convert("RGB")) / 255.0
    crop = rgb[16:240, 58:282].transpose(2, 0, 1)
    want = (crop - m.reshape(3, 1, 1)) / s.reshape(3, 1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    bgr = ImageFolder(IMAGENET, IMAGENET_INPUT, Preprocess(short_side=256, crop=224, scale=0.017)).batch(0)
    rgb_scaled = ImageFolder(IMAGENET, IMAGENET_INPUT, Preprocess(short_side=256, crop=224, scale=0.017,
                                                                  channel_order="rgb")).batch(0)
    np.testing.assert_array_equal(bgr["data"][0], rgb_scaled["data"][0][::-1])


@needs_imagenet
def test_resize_is_pillow_bilinear_and_short_side_keeps_aspect():
    path = sorted(IMAGENET.iterdir())[0]
    spec = Preprocess(short_side=128, channel_order="RGB")
    assert spec.resized_size(256, 341) == (128, 171)  # floor(341 * 128 / 256 + 0.5)
    assert spec.resized_size(400, 200) == (256, 128)
    got = ImageFolder(IMAGENET, {"data": None}, spec).batch(0)["data"][0]
    with Image.open(path) as img:
        want = np.asarray(img.convert("RGB").resize((171, 128), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got, want.transpose(2, 0, 1).astype(np.float32))


def test_resize_of_a_constant_image_is_constant_and_same_size_is_identity(tmp_path):
    rng = np.random.default_rng(0)
    _write_png(tmp_path / "a.png", np.full((30, 50, 3), 77, np.uint8))
    noise = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    _write_png(tmp_path / "b.png", noise)
    out = ImageFolder(tmp_path, {"x": (1, 3, 17, 23)}, Preprocess(size=(17, 23)), batch_size=2).batch(0)["x"]
    assert np.all(out[0] == 77)
    same = ImageFolder(tmp_path, {"x": (1, 3, 30, 50)}, Preprocess(size=(30, 50), channel_order="RGB"), 2)
    np.testing.assert_array_equal(same.batch(0)["x"][1], noise.transpose(2, 0, 1))


def test_png_values_mean_std_scale_exact(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    _write_png(tmp_path / "img.png", img)
    spec = Preprocess(crop=(8, 6), mean=(10, 20, 30), std=(2, 4, 8), scale=0.5)
    got = ImageFolder(tmp_path, {"data": (1, 3, 8, 6)}, spec).batch(0)["data"][0]
    bgr = img[2:10, 2:8, ::-1].transpose(2, 0, 1).astype(np.float64)
    want = (bgr - np.array([10, 20, 30]).reshape(3, 1, 1)) / np.array([2, 4, 8]).reshape(3, 1, 1) * 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_grayscale_input_and_file_name_order(tmp_path):
    for name, value in (("b.png", 120), ("a.png", 60), ("c.jpeg", 180)):
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolder(tmp_path, {"data": (1, 1, 4, 4)}, batch_size=3)
    assert [p.name for p in src.files()] == ["a.png", "b.png", "c.jpeg"]
    batch = src.batch(0)["data"]
    assert batch.shape == (3, 1, 4, 4)
    np.testing.assert_allclose(batch[:, 0, 0, 0], [60, 120, 180], atol=1)


def test_two_inputs_from_per_input_subfolders_or_the_same_image(tmp_path):
    for sub, base in (("left", 10), ("right", 100)):
        (tmp_path / sub).mkdir()
        for i in range(3):
            _write_png(tmp_path / sub / f"{i}.png", np.full((6, 6, 3), base + i, np.uint8))
    inputs = {"left": (1, 3, 6, 6), "right": (1, 3, 4, 4)}
    src = ImageFolder(tmp_path, inputs, {"right": Preprocess(crop=4, mean=100)}, batch_size=3)
    batch = src.batch(0)
    assert batch["left"].shape == (3, 3, 6, 6) and batch["right"].shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(batch["left"][:, 0, 0, 0], [10, 11, 12])
    np.testing.assert_array_equal(batch["right"][:, 0, 0, 0], [0, 1, 2])

    flat = tmp_path / "left"
    shared = ImageFolder(flat, {"a": (1, 3, 6, 6), "b": (1, 3, 6, 6)},
                         {"a": Preprocess(), "b": Preprocess(scale=2)}, batch_size=1)
    np.testing.assert_array_equal(shared.batch(1)["b"], 2 * shared.batch(1)["a"])


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope", ["data"])
    with pytest.raises(DataError, match="holds no image"):
        ImageFolder(tmp_path, ["data"])
    _write_png(tmp_path / "a.png", np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(DataError, match="cannot be centre-cropped to 11x11"):
        ImageFolder(tmp_path, ["data"], Preprocess(crop=11)).batch(0)
    with pytest.raises(DataError, match=r"preprocessed to 10x12 but input 'data' takes 8x8.*--resize"):
        ImageFolder(tmp_path, {"data": (1, 3, 8, 8)}).batch(0)
    with pytest.raises(DataError, match="of 2 channels"):
        ImageFolder(tmp_path, {"data": (1, 2, 10, 12)}).batch(0)
    with pytest.raises(DataError, match="cannot take images"):
        ImageFolder(tmp_path, {"data": (1, 120)})
    with pytest.raises(DataError, match="batches of 2 need 4"):
        list(ImageFolder(tmp_path, ["data"], batch_size=2).batches(2))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png: cannot read the image"):
        ImageFolder(tmp_path, ["data"], batch_size=2).batch(0)
    for bad in ({"channel_order": "YUV"}, {"size": (0, 3)}, {"std": (1, 0, 1)}, {"size": 4, "short_side": 4},
                {"scale": (1, 2)}):
        with pytest.raises(DataError, match="Preprocess"):
            Preprocess(**bad)
    with pytest.raises(DataError, match="unknown field"):
        Preprocess.from_dict({"means": [1, 2, 3]})
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="pip install pillow"):
        ImageFolder(tmp_path, ["data"]).batch(0)


def test_entries_named_like_images_that_are_not_files_are_named(tmp_path, caplog):
    _write_png(tmp_path / "a.png", np.full((8, 8, 3), 5, np.uint8))
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")  # a broken link
    (tmp_path / "dir.png").mkdir()
    with caplog.at_level("WARNING", logger="amct_caffe"):
        folder = ImageFolder(tmp_path, {"x": (1, 3, 8, 8)}, Preprocess(size=(8, 8)), batch_size=1)
    assert folder.num_samples == 1
    assert "2 entries with an image's name are not a readable file (a broken link or a folder), left out: " \
           "dir.png, gone.jpg" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="amct_caffe"):  # listed again (a command lists it three times): told once
        ImageFolder(tmp_path, {"x": (1, 3, 8, 8)}, Preprocess(size=(8, 8)), batch_size=1)
    assert "left out" not in caplog.text


def test_a_jpeg_turns_as_its_exif_orientation_says_read_as_color_or_gray(tmp_path):
    """OpenCV's imread in colour or gray (Caffe's convert_imageset, its ImageData layer) applies the EXIF
    orientation; as stored (IMREAD_UNCHANGED) it does not. A camera's portrait photo (orientation 6: turn
    90 degrees clockwise) was read on its side."""
    from PIL import Image

    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:20, :20] = 255  # a white top-left corner
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    color = decode_image(tmp_path / "portrait.jpg", 3, "portrait.jpg")
    gray = decode_image(tmp_path / "portrait.jpg", 1, "portrait.jpg")
    stored = decode_image(tmp_path / "portrait.jpg", None, "portrait.jpg")
    assert color.shape == (60, 40, 3) and gray.shape == (60, 40, 1) and stored.shape == (40, 60, 3)
    assert color[:20, -20:].mean() > 200 and color[:20, :20].mean() < 50  # the corner went to the top right


def test_a_16_bit_image_turns_as_its_exif_orientation_says_too():
    """A 16-bit gray PNG is brought to 8 bits (its high byte) after it is turned: the conversion dropped the
    EXIF, so it was read on its side where the 8-bit one was turned."""
    import io

    from PIL import Image

    pixels = (np.arange(6, dtype=np.uint16).reshape(2, 3) + 1) * 2560  # high bytes 10, 20, ... 60
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif)
    gray = decode_image(buffer.getvalue(), 1, "gray16.png")
    assert gray[:, :, 0].tolist() == [[40, 10], [50, 20], [60, 30]]
