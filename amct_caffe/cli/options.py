"""What the commands share: argument types, file checks, the data and preprocessing options.

``calibrate``, ``compare`` and ``run`` read their data the same way: :func:`add_data_options` adds the
flags (input shapes, sample selection, image preprocessing) and :func:`open_data` turns them into a
:class:`~amct_caffe.data.DataSource`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import logging
import re
from pathlib import Path

from amct_caffe.errors import AmctError
from amct_caffe.io import paths

_LOG = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ argument types
def cosine(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a cosine in (0, 1], got {text!r}")
    return value


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ------------------------------------------------------------------------------------------ files
def check_file(label: str, path) -> None:
    """``path`` (named ``label`` in messages) is an existing regular file."""
    p = Path(path)
    if p.is_dir():
        raise AmctError(f"{label} {path} is a directory, not a file")
    if p.exists() and not p.is_file():  # a device or a FIFO: reading it may never end
        raise AmctError(f"{label} {path} is not a regular file")
    if not p.is_file():
        if label == "--preprocess" and str(path).lstrip().startswith("{"):
            raise AmctError("--preprocess takes the path of a JSON file, not the JSON itself: write the specs to a "
                            "file and give its path")
        raise AmctError(f"{label} {path} does not exist")


def check_files(**paths) -> None:
    for what, path in paths.items():
        check_file(f"{what} file", path)


def check_output(prefix: str) -> None:
    """Fail before any work when the files ``<prefix>_*`` cannot be created."""
    if not os.path.basename(prefix):
        raise AmctError(f"--output {prefix}: end it with a file name prefix, e.g. {prefix.rstrip('/')}/model")
    check_parent("--output", prefix)


def check_parent(flag: str, path) -> None:
    """The nearest existing ancestor of ``path`` is a folder (so ``path`` can be created)."""
    parent = Path(path).parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise AmctError(f"{flag} {path}: {folder} is a file, not a folder")
            break


def check_output_file(flag: str, path, suffix: str) -> None:
    """``path`` can be written as a ``suffix`` file (not a folder; its folder can be created)."""
    if Path(path).suffix.lower() != suffix:
        raise AmctError(f"{flag} {path}: expected a {suffix} file name")
    if Path(path).is_dir():
        raise AmctError(f"{flag} {path} is a directory")
    check_parent(flag, path)
    paths.check_output(path)  # not an input of the command, nor inside an input folder: refused before the work


def check_output_dir(flag: str, path) -> None:
    """``path`` is a folder or can be created as one."""
    if Path(path).exists() and not Path(path).is_dir():
        raise AmctError(f"{flag} {path} is a file, not a folder")
    check_parent(flag, path)
    paths.check_output_folder(path)  # a report's plots in a data folder: refused before the work


def api(module: str, function: str):
    """``module.function``, imported when the command runs (a missing one is a clear error)."""
    try:
        return getattr(importlib.import_module(module), function)
    except (ModuleNotFoundError, AttributeError) as e:
        raise AmctError(f"{module}.{function} is not available in this installation: {e}") from None


def print_outputs(result, prefix: str) -> None:
    if isinstance(result, dict) and result:
        for kind, path in result.items():
            print(f"{kind}: {path}")
        return
    prefix_path = Path(prefix)
    for path in sorted(prefix_path.parent.glob(prefix_path.name + "_*")):
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------- config
def _setting(path: str, name: str, value, written: bool, wanted) -> str:
    """What ``path`` says of ``name``, and how to get ``wanted`` instead."""
    def shown(v):
        v = str(v).lower() if isinstance(v, bool) else v
        return f'"{name}": {v}' if path.endswith(".json") else f"{name}: {v}"
    if written:
        return f"{path} sets {shown(value)} (change it there instead)"
    default = shown(value).split()[-1]
    return f"{path} does not set {name}, so its default {default} applies (write {shown(wanted)} there)"


def config_values(args) -> tuple[int, bool, int]:
    """The batch_num and activation_offset that apply, the forwards update_bn asks for (0 without it), and a
    warning for each flag a config file overrides.

    With --config (JSON) or --cfg, the file's global fields define the config and the arguments of the
    same names are ignored (the guide: 此时输入参数中该参数配置不生效), so --batch-num and
    --no-activation-offset only count without one. ``args.batch_num`` is None when not given.
    """
    config, cfg = getattr(args, "config", None), getattr(args, "cfg", None)
    if not config and not cfg:
        return args.batch_num or 1, args.activation_offset, 0
    path = config or cfg
    settings = api("amct_caffe.api.model_info", "config_settings")(config_file=config, config_defination=cfg)
    batch_num, offset, written = settings["batch_num"], settings["activation_offset"], settings["written"]
    if args.batch_num is not None and args.batch_num != batch_num:
        _LOG.warning("--batch-num %d is ignored: the fields of %s win over the command line, and %s", args.batch_num,
                     path, _setting(path, "batch_num", batch_num, "batch_num" in written, args.batch_num))
    if not args.activation_offset and offset:
        _LOG.warning("--no-activation-offset is ignored: the fields of %s win over the command line, and %s", path,
                     _setting(path, "activation_offset", True, "activation_offset" in written, False))
    return batch_num, offset, settings["bn_update_iterations"]


# ------------------------------------------------------------------------------------------- data
DATA_HELP = ("image folder (JPEG/PNG/BMP, sorted by name), .npy / .npz (arrays named after the inputs), "
             "Caffe LMDB folder, or Record directory")


def add_data_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--input-shape, --select and the image preprocessing group (``what``: the data's use, for help)."""
    parser.add_argument("--input-shape", nargs="+", metavar="[NAME:]N,C,H,W",
                        help="input shape(s), overriding the prototxt's (which must declare each input's shape)")
    parser.add_argument("--select", metavar="START:STOP:STEP",
                        help=f"use only these samples for {what}, in slice syntax: ::10 = every tenth, "
                             "0:500 = the first 500")
    pre = parser.add_argument_group("image preprocessing (images and LMDB; mean/std/scale also for arrays)",
                                    "x = (pixel - mean[c]) / std[c] * scale, after resize, centre crop and "
                                    "channel order. Without --resize / --crop, images are resized to the "
                                    "input's HxW (Pillow bilinear).")
    pre.add_argument("--resize", type=positive, nargs="+", metavar="N",
                     help="S: short side to S (aspect kept); H W: exactly H x W")
    pre.add_argument("--crop", type=positive, nargs="+", metavar="N", help="centre crop H W (or one value)")
    pre.add_argument("--mean", type=finite, nargs="+",
                     help="mean: one value, or one per channel in the output channel order")
    pre.add_argument("--std", type=finite, nargs="+", help="std: one value, or one per channel")
    pre.add_argument("--scale", type=finite, default=1.0, help="multiplies after mean / std")
    pre.add_argument("--channel-order", type=str.upper, choices=["BGR", "RGB"], default="BGR",
                     help="channel order the model expects (default BGR, as Caffe)")
    pre.add_argument("--preprocess", metavar="FILE",
                     help="a JSON file of per-input specs "
                          "{input: {size, short_side, crop, channel_order, mean, std, scale}}")


def parse_shapes(entries, model_shapes: dict) -> dict:
    """Apply ``--input-shape [NAME:]D0,D1,...`` entries to the prototxt's input shapes."""
    if not model_shapes:  # (--input-shape only sets the shapes of declared inputs: it cannot add one)
        raise AmctError("the model declares no input to feed the data to (an Input layer, or the input: field with "
                        "input_dim / input_shape: without them Caffe drops it); a TRAIN / TEST prototxt that reads "
                        "Data / ImageData layers is not the model to give: give the deploy prototxt")
    shapeless = [name for name, shape in model_shapes.items() if shape is None]
    if shapeless:  # Caffe cannot build such a net either: the layers after the input need its axes
        raise AmctError(f"the model declares no shape for input '{shapeless[0]}': give it one in the prototxt "
                        "(input_param { shape { dim: N dim: C dim: H dim: W } }); --input-shape overrides a "
                        "declared shape, it cannot stand for a missing one")
    shapes = dict(model_shapes)
    for entry in entries or ():
        name, _, dims = entry.rpartition(":")
        if not name:
            if len(shapes) != 1:
                raise AmctError(f"--input-shape {entry}: the model has {len(shapes)} inputs "
                                f"({', '.join(shapes) or 'none declared'}); write NAME:{entry}")
            name = next(iter(shapes))
        elif name not in model_shapes:
            raise AmctError(f"--input-shape {entry}: the model has no input '{name}' "
                            f"(inputs: {', '.join(model_shapes)})")
        try:
            shape = tuple(int(d) for d in re.split(r"[,x]", dims))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise AmctError(f"--input-shape {entry}: expected positive integers such as 1,3,224,224")
        shapes[name] = shape
    return shapes


def parse_select(text: str | None) -> slice:
    """``--select START:STOP:STEP`` (Python slice syntax; ``::10`` keeps every tenth sample)."""
    if not text:
        return slice(None)
    parts = text.split(":")
    try:
        if len(parts) > 3:
            raise ValueError
        values = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise AmctError(f"--select {text}: expected START:STOP:STEP, e.g. ::10 or 0:500") from None
    if len(values) == 1:  # a single number: the first N samples
        return slice(None, values[0])
    if len(values) > 2 and values[2] is not None and values[2] < 1:
        raise AmctError(f"--select {text}: the step must be positive")
    return slice(*values)


def preprocess(args, shapes: dict, kind: str):
    """{input name: Preprocess} from the flags, with --preprocess JSON entries taking precedence."""
    from amct_caffe.data import Preprocess

    resize = args.resize or []
    if len(resize) > 2:
        raise AmctError("--resize takes one value (short side) or two (height width)")
    crop = args.crop or []
    if len(crop) > 2:
        raise AmctError("--crop takes one value (square) or two (height width)")
    per_json = {}
    if args.preprocess:
        from amct_caffe.config.checks import load_config_json
        from amct_caffe.io.files import read_text

        doc = load_config_json(read_text(args.preprocess, "preprocessing"), f"--preprocess {args.preprocess}",
                               "preprocessing file")
        if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
            raise AmctError(f"--preprocess {args.preprocess}: expected {{input name: {{field: value}}}}")
        unknown = sorted(set(doc) - set(shapes))
        if unknown:
            raise AmctError(f"--preprocess {args.preprocess}: no model input named {', '.join(unknown)}")
        per_json = {n: Preprocess.from_dict(d, f"--preprocess {args.preprocess}: '{n}'")
                    for n, d in doc.items()}
    if args.std and any(v == 0 for v in args.std):  # (Preprocess would name its own field)
        raise AmctError(f"--std {' '.join(f'{v:g}' for v in args.std)}: every value must be non-zero (the data is "
                        "divided by it)")
    out = {}
    for name, shape in shapes.items():
        fits = kind == "images" and shape is not None and len(shape) == 4  # (an image input: (N, C, H, W))
        if name in per_json:
            entry = per_json[name]
            if fits and entry.size is None and entry.short_side is None and entry.crop is None:
                entry = dataclasses.replace(entry, size=tuple(shape[2:]))  # as for the flags: the input's H x W
            out[name] = entry
            continue
        size = tuple(resize) if len(resize) == 2 else None
        if fits and not resize and not crop:
            size = tuple(shape[2:])  # no geometry given: resize straight to the input's H x W
        out[name] = Preprocess(size=size, short_side=resize[0] if len(resize) == 1 else None,
                               crop=(crop[0], crop[-1]) if crop else None, channel_order=args.channel_order,
                               mean=tuple(args.mean or ()), std=tuple(args.std or ()), scale=args.scale)
    return out


def open_data(args, path, model_shapes: dict, batch_size: int = 0, select: bool = True, time_major=()):
    """(source, input shapes, batch size) for ``path`` with the data options of ``args`` (and their
    --select, unless ``select`` is False). ``batch_size`` 0: the first input's batch dimension (axis 1
    of a ``time_major`` input, one a recurrent layer reads as ``(T, N, ...)``)."""
    from amct_caffe.data import detect_kind, model_batch_size, open_source

    if args.preprocess:
        check_file("--preprocess", args.preprocess)
    shapes = parse_shapes(args.input_shape, model_shapes)
    kind = detect_kind(path)
    batch_size = batch_size or model_batch_size(shapes, time_major)
    source = open_source(path, shapes, batch_size, preprocess(args, shapes, kind), time_major)
    # an image folder's per-input sub-folders are read too: an output there is refused as in the folder itself
    paths.also_reading(**{f"--data (input '{name}')": folder for name, folder in getattr(source, "folders", {}).items()
                          if os.path.realpath(folder) != os.path.realpath(path)})
    if select:
        sel = parse_select(args.select)
        source = source.select(sel.start, sel.stop, sel.step)
    return source, shapes, batch_size
