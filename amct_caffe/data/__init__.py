"""Calibration data: sources that yield fixed-size batches {input blob name: float32 (N, C, H, W)}.

* :class:`ImageFolder` — JPEG / PNG / BMP files (Pillow), with a :class:`Preprocess` per input
  (resize, centre crop, BGR|RGB, mean, std, scale);
* :class:`ArrayData` — a .npy / .npz file or arrays in memory;
* :class:`LmdbData` — a Caffe LMDB of ``Datum`` (the ``lmdb`` package);
* :class:`Record` — saves what a user's own inference loop feeds the net; ``Record.load`` serves it.

:func:`open_source` picks one from a path; :func:`model_inputs` reads a prototxt's input shapes.
Every source keeps a fixed order and offers ``select(start, stop, step)`` (e.g. every 10th
sample) and ``batches(batch_num)``.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from amct_caffe.data.arrays import ArrayData
from amct_caffe.data.images import IMAGE_SUFFIXES, ImageFolder, list_images
from amct_caffe.data.lmdb_data import LmdbData, is_lmdb, write_lmdb
from amct_caffe.data.preprocess import Preprocess, normalize
from amct_caffe.data.record import Record, RecordData, record_files
from amct_caffe.data.source import DataError, DataSource

__all__ = ["ArrayData", "DataError", "DataSource", "ImageFolder", "LmdbData", "Preprocess", "Record",
           "RecordData", "checked_feeds", "detect_kind", "given_feeds", "model_batch_size", "model_inputs",
           "normalize", "open_for_model", "open_source", "time_major_inputs", "time_major_outputs", "write_lmdb"]


def model_inputs(model_file) -> OrderedDict[str, tuple[int, ...] | None]:
    """{input blob name: shape} of a prototxt's ``Input`` layers (legacy ``input:`` fields included).

    A top without a declared shape maps to None.
    """
    from amct_caffe import io

    return _input_shapes(io.load_prototxt(model_file))


def _input_shapes(net) -> OrderedDict[str, tuple[int, ...] | None]:
    """:func:`model_inputs` of a parsed NetParameter."""
    shapes: OrderedDict[str, tuple[int, ...] | None] = OrderedDict()
    for layer in net.layer:
        if layer.type != "Input":
            continue
        declared = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
        for i, top in enumerate(layer.top):
            if len(declared) == 1:
                shapes[top] = declared[0]
            else:
                shapes[top] = declared[i] if i < len(declared) else None
    return shapes


def time_major_inputs(model_file) -> list[str]:
    """The inputs of a prototxt that a recurrent layer reads with the batch on axis 1.

    Caffe's LSTM / RNN take ``x (T, N, ...)``, ``cont (T, N)`` and ``h0`` / ``c0 (1, N, H)``; only the
    static input is ``(N, ...)``. Calibration files hold samples first (``(S, T, ...)``, ``(S, T)``),
    as for every other input, and the sources serve these inputs transposed. An input also counts when it
    reaches such a bottom through layers that keep its first two axes (an Embed, an InnerProduct on axis 2).
    """
    from amct_caffe import io, ops

    net = io.load_prototxt(model_file)
    declared = set(_input_shapes(net))
    return [b for b in ops.time_major_blobs(net.layer) if b in declared]


def time_major_outputs(model_file, names) -> list[str]:
    """Those of the blobs ``names`` that carry the batch on axis 1: a recurrent layer's tops (``(T, N, H)``,
    ``hT (1, N, H)``) and what layers keeping their first two axes make of them."""
    from amct_caffe import io, ops

    found = set(ops.time_major_blobs(io.load_prototxt(model_file).layer, downstream=True))
    return [n for n in names if n in found]


def detect_kind(path) -> str:
    """"arrays", "lmdb", "record" or "images", from what ``path`` holds."""
    p = Path(path)
    if p.is_file() and p.suffix in (".npy", ".npz"):
        return "arrays"
    if is_lmdb(p):
        return "lmdb"
    if p.is_dir():
        if record_files(p):
            return "record"
        if list_images(p) or any(d.is_dir() and list_images(d) for d in p.iterdir()):
            return "images"
        raise DataError(f"{p} holds no calibration data: expected images ({', '.join(IMAGE_SUFFIXES)}), "
                        "an LMDB (data.mdb) or recorded batches (batch_NNNNNN.npz)")
    if not p.exists():
        raise DataError(f"calibration data {p} does not exist")
    raise DataError(f"calibration data {p}: expected an image folder, a .npy / .npz file, an LMDB or a "
                    "Record directory")


def open_source(path, inputs: Mapping[str, Sequence[int] | None], batch_size: int = 1,
                preprocess: Preprocess | Mapping[str, Preprocess] | None = None,
                time_major: Sequence[str] = ()) -> DataSource:
    """The data source for ``path`` (see :func:`detect_kind`) feeding ``inputs`` {name: shape}.

    ``preprocess`` applies in full to images and LMDB records; for arrays only its mean, std and
    scale apply (a resize or crop is an error); recorded batches are served as they were fed.
    ``time_major``: inputs whose model shape is ``(T, N, ...)`` (:func:`time_major_inputs`); the
    files hold them sample-first and the source serves them transposed (recorded batches excepted).
    """
    kind = detect_kind(path)
    if time_major and kind != "record":
        def sample_first(shape):
            return None if shape is None or len(shape) < 2 else (shape[1], shape[0], *shape[2:])
        inputs = {n: sample_first(s) if n in time_major else s for n, s in inputs.items()}
        return _open(kind, path, inputs, batch_size, preprocess).with_time_major(
            [n for n in time_major if n in inputs])
    return _open(kind, path, inputs, batch_size, preprocess)


def checked_feeds(batches, who: str, inputs: Sequence[str] = ()) -> Iterator[dict[str, np.ndarray]]:
    """The batches a Python caller gives (``{input blob: array}``, or an iterable of them), each
    checked as it is drawn, so that a stream stays a stream: every batch must be a non-empty mapping
    whose arrays hold at least one sample, and give each of the model's ``inputs`` (a net's forward
    would otherwise run on what the blob held before, as pycaffe's does). Anything else raises
    :class:`DataError` naming ``who``."""
    if isinstance(batches, Mapping):  # one batch
        batches = [batches]
    if batches is None or isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise DataError(f"{who}: expected {{input blob: array}} batches (a list of them, or a generator), got "
                        f"{type(batches).__name__}")
    for i, feed in enumerate(batches):
        if not isinstance(feed, Mapping) or not feed:
            raise DataError(f"{who}: batch {i} is {type(feed).__name__ if feed is not None else 'None'}"
                            f"{' (empty)' if isinstance(feed, Mapping) else ''}, not a {{input blob: array}} mapping")
        out = {}
        for name, value in feed.items():
            array = np.asarray(value)
            if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
                raise DataError(f"{who}: batch {i}: input '{name}' holds {array.dtype} values, not numbers")
            if np.iscomplexobj(array):  # numpy would drop the imaginary part, with a warning on screen
                raise DataError(f"{who}: batch {i}: input '{name}' holds complex values ({array.dtype}); a net "
                                "takes real inputs: give the real part (or magnitude) you mean")
            if array.ndim == 0 or len(array) == 0:
                raise DataError(f"{who}: batch {i}: input '{name}' holds no sample (shape {list(array.shape)})")
            out[str(name)] = array
        missing = [name for name in inputs if name not in out]
        if missing:
            raise DataError(f"{who}: batch {i} gives no {', '.join(repr(m) for m in missing)} (the model's inputs: "
                            f"{', '.join(inputs)}); give every input in every batch")
        yield out


def model_batch_size(shapes: Mapping[str, Sequence[int] | None], time_major: Sequence[str] = ()) -> int:
    """The batch size a model declares: its first input's batch dimension (axis 1 of an input a
    recurrent layer reads time-major, ``(T, N, ...)``); 1 when undeclared."""
    name, first = next(iter(shapes.items()), ("", None))
    if not first:
        return 1
    return int(first[1] if name in time_major and len(first) > 1 else first[0])


def open_for_model(path, model_file, batch_size: int = 0,
                   preprocess: Preprocess | Mapping[str, object] | None = None) -> DataSource:
    """:func:`open_source` for the inputs of ``model_file``, in batches of ``batch_size`` (0: the
    model's, :func:`model_batch_size`), its time-major inputs served as the model reads them.
    ``preprocess``: a :class:`Preprocess`, one per input, or the fields of one."""
    shapes = model_inputs(model_file)
    time_major = time_major_inputs(model_file)
    if isinstance(preprocess, Mapping) and not all(isinstance(v, Preprocess) for v in preprocess.values()):
        preprocess = Preprocess.from_dict(preprocess)
    elif preprocess is not None and not isinstance(preprocess, (Preprocess, Mapping)):
        raise DataError(f"preprocess must be a Preprocess, a dict of its fields or one Preprocess per input, "
                        f"got {type(preprocess).__name__} {preprocess!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise DataError(f"batch_size must be an integer >= 0 (0: the model's), got {batch_size!r}")
    return open_source(path, shapes, batch_size or model_batch_size(shapes, time_major), preprocess, time_major)


def given_feeds(data, model_file, who: str, batch_size: int = 0, batch_num: int = 0,
                preprocess=None) -> list[dict[str, np.ndarray]]:
    """The batches a call of ``who`` (compare_model, label_free_retrain) was given, as a list: a data
    path read as ``calibrate --data`` reads it (:func:`open_for_model`, ``batch_size`` 0: the
    model's), a :class:`DataSource`, or the caller's {input: array} batches (:func:`checked_feeds`);
    the first ``batch_num`` of them (0: all)."""
    if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num < 0:
        raise DataError(f"batch_num must be an integer >= 0 (0: every batch given), got {batch_num!r}")
    if isinstance(data, (str, os.PathLike)):
        data = open_for_model(data, model_file, batch_size, preprocess)
    if isinstance(data, DataSource):
        feeds = list(data.batches(batch_num or None))
        if not feeds:
            raise DataError(f"{who} data: {data.holds()}, fewer than one batch of {data.batch_size}: give more data, "
                            "or a model whose inputs take fewer samples per batch")
        return feeds
    inputs = list(model_inputs(model_file)) if data is not None else []
    feeds = list(itertools.islice(checked_feeds(data, f"{who} data", inputs), batch_num or None)) \
        if data is not None else []
    if not feeds:
        raise DataError(f"{who} needs data: a path (image folder, .npy/.npz, LMDB, Record directory) or a "
                        "non-empty sequence of {input blob: array} batches")
    return feeds


def _open(kind: str, path, inputs, batch_size: int, preprocess) -> DataSource:
    if kind == "images":
        return ImageFolder(path, inputs, preprocess, batch_size)
    if kind == "lmdb":
        return LmdbData(path, inputs, preprocess, batch_size)
    specs = list(preprocess.values()) if isinstance(preprocess, Mapping) else [preprocess]
    specs = [s for s in specs if s is not None]
    if kind == "record":
        if any(s != Preprocess() for s in specs):
            raise DataError(f"{path} holds recorded batches, fed as they were recorded: "
                            "no preprocessing applies")
        return RecordData(path, inputs, batch_size)
    if any(s.resizes or s.crop is not None or s.channel_order != "BGR" for s in specs):
        raise DataError(f"{path}: resize, crop and channel order apply to images, not to arrays")
    if len({(s.mean, s.std, s.scale) for s in specs}) > 1:
        raise DataError(f"{path}: one mean / std / scale applies to all arrays")
    spec = specs[0] if specs else Preprocess()
    return ArrayData(path, inputs, mean=spec.mean, std=spec.std, scale=spec.scale, batch_size=batch_size)
