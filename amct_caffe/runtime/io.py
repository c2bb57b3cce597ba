"""pycaffe's ``caffe.io`` (``python/caffe/io.py``), for scripts run with ``import amct_caffe.runtime as caffe``.

The same names, arguments and results:

* protobuf conversions: :func:`blobproto_to_array` / :func:`array_to_blobproto`,
  :func:`arraylist_to_blobprotovector_str` / :func:`blobprotovector_str_to_arraylist`,
  :func:`array_to_datum` / :func:`datum_to_array`, on the messages of the caffe.proto in use
  (``caffe.io.caffe_pb2``, also ``caffe.proto.caffe_pb2``: ours or :func:`amct_caffe.set_caffe_proto`'s;
  a message of another caffe_pb2 is read alike);
* :class:`Transformer`, an input's preprocessing for a Net: ``preprocess(name, image)`` takes an
  (H, W, K) image, resizes it to the input's height and width when they differ, then applies each step
  that was set: the transpose (``(2, 0, 1)`` gives the Net's (K, H, W)), the channel order,
  ``* raw_scale``, ``- mean``, ``* input_scale``; float32. ``deprocess`` undoes them. (pycaffe compares
  the image's size with the input shape as given, so an input shape given as a list makes it resize an
  image of the right size too; here the sizes are compared as numbers);
* :func:`load_image` (float32 in [0, 1]: an RGB image (H, W, 3), or grey (H, W, 1); scikit-image's reading
  otherwise, e.g. of an animated GIF), :func:`resize_image`, :func:`oversample` (the four corner crops and
  the centre one, and their mirror images).

Reading and resizing images is scikit-image's, as in pycaffe (``skimage.io.imread``,
``skimage.transform.resize(order, mode="constant")``; other channel counts than 1 and 3 go through
``scipy.ndimage.zoom``), so results are those of the installed scikit-image; they are imported when first
needed (``pip install "amct_caffe[pycaffe]"``).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import AmctError
from amct_caffe.io.schema import caffe_pb

__all__ = ["Transformer", "array_to_blobproto", "array_to_datum", "arraylist_to_blobprotovector_str",
           "blobproto_to_array", "blobprotovector_str_to_arraylist", "datum_to_array", "load_image", "oversample",
           "resize_image"]


def __getattr__(name: str):
    if name == "caffe_pb2":  # pycaffe's io has the generated module; here the caffe.proto in use
        return caffe_pb()
    raise AttributeError(f"module 'caffe.io' has no attribute {name!r}")


def _optional(module: str, what: str):
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AmctError(f"caffe.io.{what} uses {module.split('.')[0]}, as pycaffe's does: pip install "
                        f"\"amct_caffe[pycaffe]\" (or scikit-image and scipy) ({e})") from e


# ------------------------------------------------------------------ protobuf <-> arrays
def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) as an array of its shape: the legacy num/channels/height/width when any
    of them is set, else ``shape.dim``."""
    values = np.array(blob.diff if return_diff else blob.data)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return values.reshape(blob.num, blob.channels, blob.height, blob.width)
    return values.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr, diff=None):
    """A BlobProto of ``arr``'s shape and values (and ``diff``'s, not checked against ``arr``)."""
    arr = np.asarray(arr)
    blob = caffe_pb().BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.astype(float).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff).astype(float).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    """The serialized BlobProtoVector of the arrays."""
    vector = caffe_pb().BlobProtoVector()
    vector.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vector.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> list[np.ndarray]:
    """The arrays of a serialized BlobProtoVector."""
    vector = caffe_pb().BlobProtoVector()
    vector.ParseFromString(data)
    return [blobproto_to_array(b) for b in vector.blobs]


def array_to_datum(arr, label=None):
    """A Datum of a (C, H, W) array: uint8 values as its ``data`` bytes, any other type as ``float_data``."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape.")  # pycaffe's words
    datum = caffe_pb().Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).ravel().tolist())
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum) -> np.ndarray:
    """A Datum's values as (C, H, W): uint8 from ``data`` when it holds bytes, else float64 of ``float_data``
    (the label stays in ``datum.label``)."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    return np.array(datum.float_data, dtype=float).reshape(shape)


# ------------------------------------------------------------------ preprocessing
class Transformer:
    """Per input blob of ``inputs`` ({name: shape (N, K, H, W)}), the steps :meth:`preprocess` applies."""

    def __init__(self, inputs):
        self.inputs = inputs
        self.transpose: dict = {}
        self.channel_swap: dict = {}
        self.raw_scale: dict = {}
        self.mean: dict = {}
        self.input_scale: dict = {}

    def _check(self, name) -> None:
        if name not in self.inputs:
            raise Exception(f"{name} is not one of the net inputs: {self.inputs}")  # noqa: TRY002 - pycaffe's type

    def preprocess(self, in_, data) -> np.ndarray:
        """An (H', W', K) image as input ``in_`` takes it (module doc); float32."""
        self._check(in_)
        out = np.array(data, dtype=np.float32)  # a copy: the steps below work in place, never on the caller's array
        size = tuple(self.inputs[in_][2:])
        if out.shape[:2] != size:
            out = resize_image(out, size)
        if in_ in self.transpose:
            out = out.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            out = out[list(self.channel_swap[in_]), :, :]
        if self.raw_scale.get(in_) is not None:
            out *= self.raw_scale[in_]
        if self.mean.get(in_) is not None:
            out -= self.mean[in_]
        if self.input_scale.get(in_) is not None:
            out *= self.input_scale[in_]
        return out

    def deprocess(self, in_, data) -> np.ndarray:
        """:meth:`preprocess` undone, in reverse order (no resizing back)."""
        self._check(in_)
        out = np.array(data).squeeze()
        if self.input_scale.get(in_) is not None:
            out /= self.input_scale[in_]
        if self.mean.get(in_) is not None:
            out += self.mean[in_]
        if self.raw_scale.get(in_) is not None:
            out /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            out = out[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            out = out.transpose(np.argsort(self.transpose[in_]))
        return out

    def set_transpose(self, in_, order) -> None:
        """The axis order to apply, e.g. (2, 0, 1) for an (H, W, K) image to (K, H, W)."""
        self._check(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise Exception("Transpose order needs to have the same number of dimensions as the input.")  # noqa: TRY002
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order) -> None:
        """The channel order to take after the transpose, e.g. (2, 1, 0) for RGB to BGR."""
        self._check(in_)
        if len(order) != self.inputs[in_][1]:
            raise Exception("Channel swap needs to have the same number of dimensions as the input channels.")  # noqa: TRY002
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale) -> None:
        """The factor applied before the mean (255 for models trained on [0, 255] pixels)."""
        self._check(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean) -> None:
        """The mean to subtract: one value per channel, or an image (K, H, W) / (H, W), resized to the input's
        height and width if it differs (on its min-max range)."""
        self._check(in_)
        mean = np.asarray(mean)
        if mean.ndim == 1:
            if mean.shape[0] != self.inputs[in_][1]:
                raise ValueError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            shape = (1,) + mean.shape if mean.ndim == 2 else mean.shape
            if len(shape) != 3:
                raise ValueError("Mean shape invalid")
            want = tuple(self.inputs[in_][1:])
            if tuple(shape) != want:
                lo, hi = mean.min(), mean.max()
                unit = (mean.reshape(shape) - lo) / (hi - lo)
                mean = resize_image(unit.transpose(1, 2, 0), want[1:]).transpose(2, 0, 1) * (hi - lo) + lo
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale) -> None:
        """The factor applied last, after the mean."""
        self._check(in_)
        self.input_scale[in_] = scale


# ------------------------------------------------------------------ images
def load_image(filename, color: bool = True) -> np.ndarray:
    """An image file as float32 in [0, 1]: (H, W, 3) RGB with ``color`` (a grey image repeated), else
    (H, W, 1) grey; an alpha channel is dropped."""
    skimage = _optional("skimage", "load_image")
    io = _optional("skimage.io", "load_image")
    img = skimage.img_as_float(io.imread(filename, as_gray=not color)).astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def resize_image(im, new_dims, interp_order: int = 1) -> np.ndarray:
    """An (H, W, K) image resized to ``new_dims`` (height, width), float32; interpolation of order
    ``interp_order`` (1: linear). One or three channels: scikit-image's resize on the image's min-max range
    (a constant image stays that constant); other counts: scipy's zoom."""
    im = np.asarray(im)
    if im.shape[-1] in (1, 3):
        lo, hi = im.min(), im.max()
        if not hi > lo:
            return np.full((new_dims[0], new_dims[1], im.shape[-1]), lo, np.float32)
        transform = _optional("skimage.transform", "resize_image")
        unit = transform.resize((im - lo) / (hi - lo), tuple(new_dims), order=interp_order, mode="constant")
        return (unit * (hi - lo) + lo).astype(np.float32)
    ndimage = _optional("scipy.ndimage", "resize_image")
    scale = tuple(np.array(new_dims, dtype=float) / np.array(im.shape[:2]))
    return ndimage.zoom(im, scale + (1,), order=interp_order).astype(np.float32)


def oversample(images, crop_dims) -> np.ndarray:
    """(10 N, h, w, K) crops of N images (H, W, K): per image the top-left, top-right, bottom-left,
    bottom-right and centre crops, then the same five mirrored left to right."""
    height, width = images[0].shape[:2]
    ch, cw = int(crop_dims[0]), int(crop_dims[1])
    # the centre crop starts at centre - crop / 2, truncated toward zero as an int array stores it
    boxes = [(top, left) for top in (0, height - ch) for left in (0, width - cw)]
    boxes.append((int(height / 2.0 - ch / 2.0), int(width / 2.0 - cw / 2.0)))
    crops = np.empty((10 * len(images), ch, cw, images[0].shape[-1]), np.float32)
    for i, image in enumerate(images):
        five = [image[t:t + ch, left:left + cw, :] for t, left in boxes]
        crops[10 * i:10 * i + 5] = five
        crops[10 * i + 5:10 * i + 10] = [c[:, ::-1, :] for c in five]
    return crops
