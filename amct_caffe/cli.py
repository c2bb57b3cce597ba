"""The ``amct-caffe`` command line.

* ``amct-caffe run --model M.prototxt --weights W.caffemodel --input data.npz`` runs the model in the
  embedded executor and prints the top classes per sample (and the accuracy when the .npz has
  ``labels``).
* ``amct-caffe calibrate --model M --weights W --data PATH --batch-size B --batch-num N --output PREFIX``
  quantizes the model, calibrating on an image folder, a .npy / .npz, a Caffe LMDB or a Record
  directory (see :mod:`amct_caffe.data`), and prints the files written.
* ``amct-caffe convert --model M --weights W --record R --output PREFIX`` builds the quantized models
  from a scale/offset record.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from amct_caffe import log
from amct_caffe.errors import AmctError

_LOG = logging.getLogger(__name__)
EXIT_ERROR, EXIT_SIGPIPE, EXIT_SIGINT, EXIT_SIGTERM = 2, 128 + 13, 128 + 2, 128 + 15


def _check_file(label: str, path) -> None:
    """``path`` (named ``label`` in messages) is an existing regular file."""
    p = Path(path)
    if p.is_dir():
        raise AmctError(f"{label} {path} is a directory, not a file")
    if p.exists() and not p.is_file():  # a device or a FIFO: reading it may never end
        raise AmctError(f"{label} {path} is not a regular file")
    if not p.is_file():
        raise AmctError(f"{label} {path} does not exist")


def _check_files(**paths) -> None:
    for what, path in paths.items():
        _check_file(f"{what} file", path)


def _check_output(prefix: str) -> None:
    """Fail before any work when the files ``<prefix>_*`` cannot be created."""
    if not os.path.basename(prefix):
        raise AmctError(f"--output {prefix}: end it with a file name prefix, e.g. {prefix.rstrip('/')}/model")
    parent = Path(prefix).parent
    for folder in (parent, *parent.parents):  # the nearest existing ancestor must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise AmctError(f"--output {prefix}: {folder} is a file, not a folder")
            break


def _check_labels(labels, count: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.number) or labels.size != count:
        raise AmctError(f"{where}: 'labels' must hold one number per sample ({count}), not dtype "
                        f"{labels.dtype} shape {labels.shape}; rename or drop it to run without accuracy")
    return labels.reshape(-1)


def cmd_run(args) -> int:
    from amct_caffe.data.arrays import load_arrays
    from amct_caffe.runtime import TEST, Net

    _check_files(model=args.model, weights=args.weights, input=args.input)
    if Path(args.input).suffix not in (".npy", ".npz"):
        raise AmctError(f"--input {args.input}: expected a .npy or .npz file")
    net = Net(args.model, args.weights, TEST)
    if not net.inputs:
        raise AmctError(f"{args.model} declares no input (Input layer or input: field)")
    out_name = args.output or (net.outputs[0] if net.outputs else None)
    if out_name not in net.blobs:
        raise AmctError(f"--output {out_name}: {args.model} has no blob of that name "
                        f"(its outputs: {', '.join(net.outputs) or 'none'})")
    arrays, labels = load_arrays(args.input, {k: tuple(net.blobs[k].shape) for k in net.inputs})
    total = len(next(iter(arrays.values())))
    if total == 0:
        raise AmctError(f"{args.input} holds no sample")
    if labels is not None:
        labels = _check_labels(labels, total, args.input)
    n = min(total, args.limit) if args.limit else total
    model_batch = net.blobs[net.inputs[0]].shape
    bs = args.batch_size or (model_batch[0] if len(model_batch) and model_batch[0] > 0 else 1)
    results = []
    from tqdm import tqdm

    for start in tqdm(range(0, n, bs), desc="forward", unit="batch", disable=not args.progress):
        stop = min(start + bs, n)
        feed = {k: (v[start:stop].astype(np.float32) - np.float32(args.mean)) * np.float32(args.scale)
                for k, v in arrays.items()}
        results.append(np.array(net.forward(blobs=[out_name], **feed)[out_name]).reshape(stop - start, -1))
        if start == 0 and args.top_k > results[0].shape[1]:
            raise AmctError(f"--top-k {args.top_k}: blob '{out_name}' has {results[0].shape[1]} value(s) per "
                            "sample; give a smaller --top-k")
    scores = np.concatenate(results)
    top = np.argsort(-scores, axis=1)[:, : args.top_k]
    for i in range(min(n, args.show)):
        pairs = ", ".join(f"{c}:{scores[i, c]:.4f}" for c in top[i])
        label = f"  label {labels[i]}" if labels is not None else ""
        print(f"sample {i}: top-{args.top_k} [{pairs}]{label}")  # noqa: T201 - the CLI's output
    if labels is not None:
        acc = float(np.mean(top[:, 0] == labels[:n]))
        print(f"top-1 accuracy on {n} samples: {acc * 100:.2f}%")  # noqa: T201
    return 0


# ---------------------------------------------------------------------------------------- calibrate
def _parse_shapes(entries, model_shapes: dict) -> dict:
    """Apply ``--input-shape [NAME:]D0,D1,...`` entries to the prototxt's input shapes."""
    shapes = dict(model_shapes)
    for entry in entries or ():
        name, _, dims = entry.rpartition(":")
        if not name:
            if len(shapes) != 1:
                raise AmctError(f"--input-shape {entry}: the model has {len(shapes)} inputs "
                                f"({', '.join(shapes) or 'none declared'}); write NAME:{entry}")
            name = next(iter(shapes))
        elif model_shapes and name not in model_shapes:
            raise AmctError(f"--input-shape {entry}: the model has no input '{name}' "
                            f"(inputs: {', '.join(model_shapes)})")
        try:
            shape = tuple(int(d) for d in re.split(r"[,x]", dims))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise AmctError(f"--input-shape {entry}: expected positive integers such as 1,3,224,224")
        shapes[name] = shape
    if not shapes:
        raise AmctError("the model declares no input (Input layer or input: field): "
                        "give --input-shape NAME:N,C,H,W")
    return shapes


def _parse_select(text: str | None) -> slice:
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


def _preprocess(args, shapes: dict, kind: str):
    """{input name: Preprocess} from the flags, with --preprocess JSON entries taking precedence."""
    import json

    from amct_caffe.data import Preprocess

    resize = args.resize or []
    if len(resize) > 2:
        raise AmctError("--resize takes one value (short side) or two (height width)")
    crop = args.crop or []
    if len(crop) > 2:
        raise AmctError("--crop takes one value (square) or two (height width)")
    per_json = {}
    if args.preprocess:
        try:
            doc = json.loads(Path(args.preprocess).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise AmctError(f"--preprocess {args.preprocess}: cannot read the JSON: {e}") from None
        if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
            raise AmctError(f"--preprocess {args.preprocess}: expected {{input name: {{field: value}}}}")
        unknown = sorted(set(doc) - set(shapes))
        if unknown:
            raise AmctError(f"--preprocess {args.preprocess}: no model input named {', '.join(unknown)}")
        per_json = {n: Preprocess.from_dict(d, f"--preprocess {args.preprocess}: '{n}'")
                    for n, d in doc.items()}
    out = {}
    for name, shape in shapes.items():
        if name in per_json:
            out[name] = per_json[name]
            continue
        size = tuple(resize) if len(resize) == 2 else None
        if kind == "images" and not resize and not crop and shape is not None and len(shape) == 4:
            size = tuple(shape[2:])  # no geometry given: resize straight to the input's H x W
        out[name] = Preprocess(size=size, short_side=resize[0] if len(resize) == 1 else None,
                               crop=(crop[0], crop[-1]) if crop else None, channel_order=args.channel_order,
                               mean=tuple(args.mean or ()), std=tuple(args.std or ()), scale=args.scale)
    return out


def _api(module: str, function: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), function)
    except (ModuleNotFoundError, AttributeError) as e:
        raise AmctError(f"{module}.{function} is not available in this installation: {e}") from None


def _print_outputs(result, prefix: str) -> None:
    if isinstance(result, dict) and result:
        for kind, path in result.items():
            print(f"{kind}: {path}")  # noqa: T201
        return
    prefix_path = Path(prefix)
    written = sorted(prefix_path.parent.glob(prefix_path.name + "_*"))
    for path in written:
        print(f"wrote {path}")  # noqa: T201


def cmd_calibrate(args) -> int:
    import itertools

    from amct_caffe.data import detect_kind, model_inputs, open_source

    _check_files(model=args.model, weights=args.weights)
    for flag, path in (("--config", args.config), ("--cfg", args.cfg), ("--preprocess", args.preprocess)):
        if path:
            _check_file(flag, path)
    _check_output(args.output)
    shapes = _parse_shapes(args.input_shape, model_inputs(args.model))
    kind = detect_kind(args.data)
    first = next(iter(shapes.values()))
    batch_size = args.batch_size or (first[0] if first else 1)
    source = open_source(args.data, shapes, batch_size, _preprocess(args, shapes, kind))
    sel = _parse_select(args.select)
    source = source.select(sel.start, sel.stop, sel.step)
    batches = source.batches(args.batch_num)  # checks there is enough data before any work
    # Decoding the first batch now finds an unreadable image, a bad LMDB record or a size mismatch
    # before the model is prepared, not minutes into the calibration.
    batches = itertools.chain([next(batches)], batches)
    _LOG.info("calibrating on %d batch(es) of %d from %s", args.batch_num, batch_size, source.describe())
    if args.target_cosine is not None:
        return _calibrate_with_fallback(args, batches)
    calibrate = _api("amct_caffe.api.workflow", "calibrate")
    # the calibration shows its one progress bar (batches), ending at 100%
    result = calibrate(args.model, args.weights, batches, args.output, args.batch_num, config_file=args.config,
                       config_defination=args.cfg, activation_offset=args.activation_offset, progress=args.progress)
    _print_outputs(result, args.output)
    return 0


def _calibrate_with_fallback(args, batches) -> int:
    """calibrate, then keep the most quantization-sensitive layers float (amct_caffe.api.fallback)."""
    calibrate_with_fallback = _api("amct_caffe.api.fallback", "calibrate_with_fallback")
    feeds = list(batches)  # read twice or three times: calibration, search, final calibration
    result = calibrate_with_fallback(args.model, args.weights, feeds, args.output, args.batch_num,
                                     target_cosine=args.target_cosine, max_float_layers=args.max_float_layers,
                                     config_file=args.config, config_defination=args.cfg,
                                     activation_offset=args.activation_offset, metric=args.fallback_metric,
                                     progress=args.progress)
    _print_outputs(result.outputs, args.output)
    print(f"output cosine ({args.fallback_metric}, FP32 vs INT8 on the calibration data): "
          f"all layers quantized {result.cosine_int8:.8f}, "
          f"saved model {result.cosine_final:.8f}, target {result.target_cosine:.8f}"
          f"{'' if result.target_met else ' (NOT met)'}")
    print(f"layers the search moved to float: {', '.join(result.float_layers) if result.float_layers else 'none'}")
    if result.sensitivity:
        ranked = sorted(result.sensitivity.items(), key=lambda kv: -kv[1])[:10]
        print("most sensitive layers (1 - output cosine with only that layer quantized): "
              + ", ".join(f"{name} {loss:.3e}" for name, loss in ranked))
    return 0


def cmd_convert(args) -> int:
    _check_files(model=args.model, weights=args.weights, record=args.record)
    _check_output(args.output)
    convert_model = _api("amct_caffe.api.convert", "convert_model")
    result = convert_model(args.model, args.weights, args.record, args.output)
    _print_outputs(result, args.output)
    return 0


def _cosine(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a cosine in (0, 1], got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amct-caffe", description=__doc__.splitlines()[0],
                                     epilog="Log messages below WARNING are not shown on the screen unless -v is "
                                            "given or AMCT_LOG_LEVEL is set; amct_log/amct_caffe.log keeps them.")
    verbose_help = "show the library's INFO messages on stderr (as AMCT_LOG_LEVEL=INFO)"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # given after the subcommand too; SUPPRESS keeps a subcommand without -v from resetting it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common],
                         help="run a model in the embedded executor and print its top outputs")
    run.add_argument("--model", required=True, help="network definition (.prototxt)")
    run.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    run.add_argument("--input", required=True, help=".npy, or .npz with arrays named after the net inputs "
                     "(or one array) and optional 'labels'")
    run.add_argument("--scale", type=_finite, default=1.0,
                     help="multiply inputs by this after subtracting --mean")
    run.add_argument("--mean", type=_finite, default=0.0, help="subtract this from inputs")
    run.add_argument("--batch-size", type=_positive, help="samples per forward (default: the model's)")
    run.add_argument("--limit", type=_positive, help="use only the first N samples")
    run.add_argument("--output", help="blob to rank (default: the net's first output)")
    run.add_argument("--top-k", type=_positive, default=3, help="classes printed per sample (default 3)")
    run.add_argument("--show", type=_non_negative, default=5,
                     help="print the top classes of this many samples (default 5)")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    run.set_defaults(func=cmd_run)

    cal = sub.add_parser("calibrate", parents=[common],
                         help="quantize a model, calibrating on images, arrays, an LMDB or a Record",
                         description="Post-training quantization: calibrate on --batch-num batches of "
                                     "--batch-size samples from --data, write the quantized models.")
    cal.add_argument("--model", required=True, help="network definition (.prototxt)")
    cal.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    cal.add_argument("--data", required=True,
                     help="image folder (JPEG/PNG/BMP, sorted by name), .npy / .npz (arrays named after the "
                          "inputs), Caffe LMDB folder, or Record directory")
    cal.add_argument("--batch-size", type=_positive, default=0,
                     help="samples per batch (default: the model's)")
    cal.add_argument("--batch-num", type=_positive, default=1, help="calibration batches (default 1)")
    group = cal.add_mutually_exclusive_group()
    group.add_argument("--config", help="quantization config (.json, as create_quant_config writes)")
    group.add_argument("--cfg", help="simple quantization config (.cfg, AMCTConfig text proto)")
    cal.add_argument("--input-shape", nargs="+", metavar="[NAME:]N,C,H,W",
                     help="input shape(s), overriding or supplying the prototxt's")
    cal.add_argument("--select", metavar="START:STOP:STEP",
                     help="use only these samples, in slice syntax: ::10 = every tenth, "
                          "0:500 = the first 500")
    pre = cal.add_argument_group("image preprocessing (images and LMDB; mean/std/scale also for arrays)",
                                 "x = (pixel - mean[c]) / std[c] * scale, after resize, centre crop and "
                                 "channel order. Without --resize / --crop, images are resized to the "
                                 "input's HxW (Pillow bilinear).")
    pre.add_argument("--resize", type=_positive, nargs="+", metavar="N",
                     help="S: short side to S (aspect kept); H W: exactly H x W")
    pre.add_argument("--crop", type=_positive, nargs="+", metavar="N", help="centre crop H W (or one value)")
    pre.add_argument("--mean", type=_finite, nargs="+", help="per-channel mean, in the output channel order")
    pre.add_argument("--std", type=_finite, nargs="+", help="per-channel std")
    pre.add_argument("--scale", type=_finite, default=1.0, help="multiplies after mean / std")
    pre.add_argument("--channel-order", type=str.upper, choices=["BGR", "RGB"], default="BGR",
                     help="channel order the model expects (default BGR, as Caffe)")
    pre.add_argument("--preprocess", metavar="JSON",
                     help="per-input specs "
                          "{input: {size, short_side, crop, channel_order, mean, std, scale}}")
    cal.add_argument("--no-activation-offset", dest="activation_offset", action="store_false",
                     help="symmetric activation quantization (no offset)")
    cal.add_argument("--output", required=True, help="prefix of the files written (e.g. out/lenet)")
    fb = cal.add_argument_group("accuracy-based fallback (keeps the most quantization-sensitive layers float)")
    fb.add_argument("--target-cosine", type=_cosine, metavar="C",
                    help="search, on the calibration data, for the fewest float layers that bring the mean "
                         "cosine of FP32 and INT8 outputs to C (e.g. 0.9995); writes <output>_fallback_config.json")
    fb.add_argument("--max-float-layers", type=_non_negative, default=16, metavar="N",
                    help="at most N layers kept float (default 16)")
    fb.add_argument("--fallback-metric", choices=["worst_output", "all_outputs"], default="worst_output",
                    help="worst_output (default): every output blob's mean cosine must reach C; all_outputs: the "
                         "cosine of all outputs concatenated per sample")
    cal.add_argument("--no-progress", dest="progress", action="store_false")
    cal.set_defaults(func=cmd_calibrate)

    conv = sub.add_parser("convert", parents=[common], help="build quantized models from a scale/offset record")
    conv.add_argument("--model", required=True, help="network definition (.prototxt)")
    conv.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    conv.add_argument("--record", required=True, help="scale/offset record file (text proto)")
    conv.add_argument("--output", required=True, help="prefix of the files written")
    conv.set_defaults(func=cmd_convert)
    return parser


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM. Like KeyboardInterrupt it is no ``Exception``, so no
    ``except Exception`` swallows it, and the ``with`` blocks it unwinds clean up as they do on Ctrl-C
    (temporary directories removed, staged outputs not committed)."""


@contextlib.contextmanager
def _signals_unwind():
    """SIGINT raises KeyboardInterrupt and SIGTERM raises :class:`Terminated` in the main thread.

    After the first of them both are ignored, so that a second Ctrl-C cannot cut the clean-up the
    first one started. A signal the parent process set to be ignored (nohup, ``&`` in a script)
    stays ignored. The previous handlers are restored on exit (``main`` also runs inside tests).
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    raises = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
    previous = {sig: signal.getsignal(sig) for sig in raises}

    def handler(signum, frame):
        for sig in raises:
            signal.signal(sig, signal.SIG_IGN)
        raise raises[signum]()

    try:
        for sig in raises:
            if previous[sig] is not signal.SIG_IGN:
                signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _one_line(text: str) -> str:
    """``text`` with control characters (a newline in a path or a tool's message, a NUL) escaped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def _error(message: str, new_line: bool = False) -> None:
    """The one error line; ``new_line``: start on a fresh line (a signal may have cut a progress bar's
    line in the middle)."""
    with contextlib.suppress(OSError, ValueError):  # stderr closed: nothing more can be said
        print(f"{chr(10) if new_line else ''}amct-caffe: {_one_line(message)}", file=sys.stderr)


def _screen_level(verbose: bool) -> int:
    """WARNING on the screen unless AMCT_LOG_LEVEL says otherwise; -v asks for INFO at least."""
    level = log.level_from_env("AMCT_LOG_LEVEL", default=logging.WARNING)
    return min(level, logging.INFO) if verbose else level


def _run(args) -> int:
    for name, value in vars(args).items():  # argv cannot hold NUL, but main(argv) from Python can
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and "\0" in item:
                raise AmctError(f"--{name.replace('_', '-')} {item!r}: contains a NUL character")
    log.setup(force=True, screen_level=_screen_level(args.verbose))
    # A file name the terminal's encoding cannot show (é on an ASCII terminal, undecodable bytes) is
    # printed escaped rather than failing after the files were written (stderr already does this).
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")
    return args.func(args)


def main(argv=None) -> int:
    """Run the command; every failure is one line on stderr and exit status 2 (130 on Ctrl-C,
    143 on SIGTERM, 141 when stdout is closed early, as by ``| head``)."""
    args = build_parser().parse_args(argv)
    with _signals_unwind():
        try:
            return _run(args)
        except AmctError as e:
            _LOG.debug("the error's traceback", exc_info=True)
            _error(f"error: {e}")
            return EXIT_ERROR
        except KeyboardInterrupt:
            _error("interrupted", new_line=getattr(args, "progress", False))
            return EXIT_SIGINT
        except Terminated:
            _error("terminated (SIGTERM)", new_line=getattr(args, "progress", False))
            return EXIT_SIGTERM
        except BrokenPipeError:
            # The reader of stdout is gone (e.g. `| head`): stop quietly, as a pipeline expects, and keep
            # the interpreter's final flush from complaining about the closed pipe.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_SIGPIPE
        except MemoryError as e:
            _LOG.debug("out of memory", exc_info=True)
            _error(f"error: out of memory{f' ({e})' if str(e) else ''}: use a smaller --batch-size, "
                   "or fewer / smaller inputs")
            return EXIT_ERROR
        except OSError as e:  # the system refused (disk full, permissions...): not a bug, say what failed
            _LOG.debug("the error's traceback", exc_info=True)
            _error(f"error: {e}")
            return EXIT_ERROR
        except Exception as e:  # a bug: one line, the traceback in the DEBUG log
            _LOG.debug("internal error", exc_info=True)
            _error(f"internal error: {type(e).__name__}: {e} -- please report it; run with "
                   "AMCT_LOG_LEVEL=DEBUG for the traceback")
            return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
