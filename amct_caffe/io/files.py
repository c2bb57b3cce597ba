"""Reading and writing files, atomically and with errors that name the file.

Every input file is read through :func:`read_bytes` / :func:`read_text` and every output written
through :func:`atomic_output` (or :class:`amct_caffe.io.outputs.StagedOutputs`): the operating
system's errors (a directory where a file is expected, a parent path that is a regular file,
permissions, a NUL byte in a path, text that is not UTF-8) become the library's own errors here,
naming the path and what to do. An output is never an input of the same call (:mod:`.paths`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import DecodeError

from amct_caffe.errors import AmctError, FileAccessError, ModelFormatError, WeightsError
from amct_caffe.io.opencv_blobs import has_raw_blobs, parse_opencv_caffemodel
from amct_caffe.io.paths import check_output, checked_path
from amct_caffe.io.schema import caffe_pb
from amct_caffe.io.scratch import signals_deferred
from amct_caffe.io.utf8 import check_replaced, check_utf8

_LOG = logging.getLogger(__name__)


def temp_file_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file in ``path``'s directory, to be renamed onto ``path``.

    mkstemp creates it readable by its owner only; the output gets the permissions a plain
    ``open(path, "w")`` would give: those of the file it replaces, else 0666 minus the umask.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            umask = os.umask(0o022)  # read the umask (setting it is the only way), then put it back
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
    except BaseException:  # the caller never learns the name: remove the file here
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd, tmp


def _os_reason(e: OSError, path: Path) -> str:
    """What an OSError on ``path`` means, in words."""
    if isinstance(e, IsADirectoryError):
        return "it is a directory"
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        parent = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        return f"{parent} is a file, not a directory" if parent is not None else (e.strerror or str(e))
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or str(e)


def write_error(path: Path, e: OSError) -> FileAccessError:
    return FileAccessError(f"cannot write {path}: {_os_reason(e, path)}; choose a location you can write to")


# Every file this process has committed (renamed into place), in order: the command line tells an interrupt that
# came after its outputs were in place (they are complete) from one that left the previous files.
COMMITTED: list[str] = []


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path``; rename it into place only if the block succeeds.

    A failed write therefore never leaves a half-written or truncated output behind. ``path`` must
    not be a file the current call reads (:func:`amct_caffe.io.paths.check_output`).
    """
    path = check_output(path)
    try:
        is_dir = path.is_dir()
    except OSError as e:  # a name the file system refuses (too long...)
        raise write_error(path, e) from None
    if is_dir:
        raise FileAccessError(f"cannot write {path}: a directory of that name exists; choose another output path")
    tmp = fd = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with signals_deferred():  # the file exists only once its name is known here (to remove it)
                fd, tmp = temp_file_beside(path)
            f, fd = os.fdopen(fd, mode), None  # the file object closes it from here on
            with f:
                yield f
            with signals_deferred():  # in place and noted as committed, or neither
                os.replace(tmp, path)
                COMMITTED.append(os.path.abspath(path))
        except OSError as e:
            raise write_error(path, e) from None
    except BaseException:
        if fd is not None:  # a signal held during its creation came before the file object took it
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def read_bytes(path, what: str, error: type[AmctError] = AmctError) -> bytes:
    """The content of input file ``path`` (``what`` names it in messages), or ``error``."""
    path = checked_path(path, f"{what} path")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"cannot read {what} file {path}: it does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {_os_reason(e, path)}") from None


def read_text(path, what: str, error: type[AmctError] = AmctError) -> str:
    """The UTF-8 text of input file ``path``, or ``error`` (also for bytes that are not UTF-8 text)."""
    data = read_bytes(path, what, error)
    _refuse_bom(data, path, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} file {path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                    f"give the {what} as a text file") from None


def _refuse_bom(data: bytes, path, what: str, error: type[AmctError]) -> None:
    """A text starting with UTF-8's byte-order mark (Windows editors' "UTF-8 with BOM"): refused by name, as
    Caffe's parser refuses it (the parsers' own errors show an invisible character)."""
    if data.startswith(b"\xef\xbb\xbf"):
        raise error(f"{what} file {path} starts with a UTF-8 byte-order mark (BOM), which Caffe's parser refuses "
                    "too: save it as UTF-8 without a BOM")


def _read(path, what: str) -> bytes:
    return read_bytes(path, what, WeightsError if what == "caffemodel" else ModelFormatError)


def _layer_near(text: str, line: int) -> str:
    """Name of the last layer whose `name:` appears before ``line`` (1-based), for messages."""
    head = "\n".join(text.splitlines()[: max(line, 0)])
    starts = [m.end() for m in re.finditer(r"\blayers?\s*\{", head)]
    if not starts:
        return ""
    # the layer's own name: a name directly inside its 'layer {' (not the net's, nor a param's of a shared weight)
    depth = 0
    for m in re.finditer(r'[{}]|\bname\s*:\s*"([^"]*)"', head[starts[-1]:]):
        if m.group(0) in "{}":
            depth += 1 if m.group(0) == "{" else -1
        elif depth == 0:
            return f" (in or after layer '{m.group(1)}')"
    return ""


# Prototxt texts this process parsed or printed, by (message class, text): the message the text
# stands for, serialized. The PTQ flow parses the user's prototxt in create_quant_config and again
# in init, and the executor parses the calibration model activation_quantize_model just printed;
# text_format's parser is pure Python (20 ms for open_nsfw), reading the binary form back is a copy.
# The class is part of the key: another schema (a user's caffe.proto) may read the text differently.
_TEXTS: dict[tuple[type, str], bytes] = {}
_TEXTS_MAX = 8
_NAN = re.compile(r"\bnan\b", re.IGNORECASE)


def _remember(message, text: str) -> None:
    while len(_TEXTS) >= _TEXTS_MAX:
        _TEXTS.pop(next(iter(_TEXTS)))
    _TEXTS[(type(message), text)] = message.SerializeToString()


# The text of each layer printed lately, by its serialized bytes: the PTQ flow prints four models
# (weights_quantize_model's, the calibration model, save_model's two) that share most of their layers.
_LAYER_TEXTS: dict[bytes, str] = {}
_LAYER_TEXTS_MAX = 8192
_NET_LAYER = 100  # NetParameter.layer: text_format prints fields in number order, so the layers come last


def _net_text(net) -> str:
    """``text_format.MessageToString(net)``, each layer's text from the cache when printed before."""
    if any(field.number > _NET_LAYER for field, _ in net.ListFields()):
        return text_format.MessageToString(net)
    top = type(net)()
    top.CopyFrom(net)
    top.ClearField("layer")
    out = [text_format.MessageToString(top)]
    for layer in net.layer:
        if len(layer.blobs):  # a caffemodel's layer: too large to keep
            out.append("layer {\n" + text_format.MessageToString(layer, indent=2) + "}\n")
            continue
        key = layer.SerializeToString(deterministic=True)
        text = _LAYER_TEXTS.get(key)
        if text is None:
            text = text_format.MessageToString(layer, indent=2)
            if len(_LAYER_TEXTS) >= _LAYER_TEXTS_MAX:
                _LAYER_TEXTS.pop(next(iter(_LAYER_TEXTS)))
            _LAYER_TEXTS[key] = text
        out.append("layer {\n" + text + "}\n")
    return "".join(out)


def message_text(message) -> str:
    """``text_format.MessageToString(message)``, remembered so that parsing the text again (when the
    file is read back) is a copy of ``message``.

    A printed text parses to the message printed, but for what text does not hold: unknown fields
    (not printed; dropped from the remembered copy) and NaN payloads (a text with a NaN is not
    remembered).
    """
    text = _net_text(message) if isinstance(message, caffe_pb().NetParameter) else text_format.MessageToString(message)
    if not _NAN.search(text):
        copy = type(message)()
        copy.CopyFrom(message)
        copy.DiscardUnknownFields()
        _remember(copy, text)
    return text


# How much of a parser's message is quoted: protobuf quotes the offending token whole (a 30 MB line of NULs).
_QUOTED = 300


def parse_failure(error: Exception) -> str:
    """A text parser's message, cut to its first :data:`_QUOTED` characters, without its final full stop."""
    text = str(error).rstrip(".")
    return text if len(text) <= _QUOTED else f"{text[:_QUOTED]} ... ({len(text):,} characters in all)"


def refuse_binary(text: str, path, what: str, error: type[AmctError]) -> None:
    """A text file holding a NUL byte is binary (a .caffemodel given for its prototxt, a download cut off and
    padded with zeros): refused at once, before a text parser quotes it whole."""
    at = text.find("\x00")
    if at >= 0:
        hint = " (a .caffemodel is the weights file, not the model)" if what == "prototxt" else ""
        raise error(f"{path}: the {what} holds a NUL byte (line {text.count(chr(10), 0, at) + 1}): it is binary, "
                    f"not text; give the text file{hint}")


def parse_prototxt_text(text: str, path: str, message=None):
    """Parse Caffe text format into ``message`` (a new NetParameter by default)."""
    msg = caffe_pb().NetParameter() if message is None else message
    empty = msg.ByteSize() == 0  # parsing into a message that holds fields merges, and may refuse
    known = _TEXTS.get((type(msg), text)) if empty else None
    if known is not None:
        msg.MergeFromString(known)
        return msg
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: protobuf's enum lookup fails on it with a SystemError
        line = text.count("\n", 0, e.start) + 1
        raise ModelFormatError(f"{path}: cannot parse prototxt{_layer_near(text, line)}: line {line} holds "
                               f"{text[e.start]!r}, which is not valid Unicode text") from None
    refuse_binary(text, path, "prototxt", ModelFormatError)
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        m = re.match(r"(\d+):(\d+)", str(e))
        where = _layer_near(text, int(m.group(1))) if m else ""
        hint = ""
        if not where and isinstance(msg, caffe_pb().NetParameter) and _SOLVER_FIELD.search(text):
            hint = (" It looks like a solver prototxt (a solver's fields: net, base_lr, ...): give the net prototxt "
                    "the solver names.")
        elif where and ("has no field named" in str(e) or "has no value named" in str(e)):
            hint = (" If this is a custom layer, compile your Caffe's caffe.proto with "
                    "amct_caffe.set_caffe_proto(path) or the AMCT_CAFFE_PROTO environment variable.")
        raise ModelFormatError(f"{path}: cannot parse prototxt{where}: {parse_failure(e)}.{hint}") from None
    _check_required(msg, path)
    if empty:
        _remember(msg, text)
    return msg


# A top-level field of Caffe's SolverParameter that a NetParameter does not have: a solver given as the net.
_SOLVER_FIELD = re.compile(r"(?m)^\s*(net|train_net|test_net|net_param|train_net_param|base_lr|lr_policy|max_iter|"
                           r"solver_mode|snapshot_prefix|test_iter|test_interval)\s*[:{]")


def _check_required(msg, path) -> None:
    """Refuse a message lacking fields its schema marks required (the tool's IFMR / SearchN / retrain
    parameters have some), as Caffe's text parser does; name the layer of each."""
    missing = msg.FindInitializationErrors()
    if not missing:
        return
    by_layer: dict[str, list[str]] = {}
    net = isinstance(msg, caffe_pb().NetParameter)
    for field in missing:
        m = re.match(r"layer\[(\d+)\]\.(.*)", field)
        if m and net:
            layer = msg.layer[int(m.group(1))]
            by_layer.setdefault(f"layer '{layer.name}' ({layer.type})", []).append(m.group(2))
        else:
            by_layer.setdefault("the net", []).append(field)
    what = "; ".join(f"{where} lacks {', '.join(fields)}" for where, fields in by_layer.items())
    raise ModelFormatError(f"{path}: required field(s) missing: {what}. Caffe refuses such a prototxt too; "
                           "give every required field (the user guide lists each layer's parameters)")


def read_prototxt(path, message=None):
    """Load a .prototxt into a NetParameter, exactly as written (no upgrade, no filtering)."""
    data = _read(path, "prototxt")
    _refuse_bom(data, path, "prototxt", ModelFormatError)
    try:
        text, replaced = data.decode("utf-8"), False
    except UnicodeDecodeError:  # comments may hold anything (as U+FFFD to the parser); a string field may not
        text, replaced = data.decode("utf-8", errors="replace"), True
    msg = parse_prototxt_text(text, str(path), message)
    if replaced:
        check_replaced(msg, path)
    return msg


def read_caffemodel(path):
    """Load a binary .caffemodel into a NetParameter (unknown fields kept for re-saving)."""
    data = _read(path, "caffemodel")
    msg = caffe_pb().NetParameter()
    error = None
    try:
        msg.ParseFromString(data)
    except (DecodeError, UnicodeDecodeError) as e:  # the latter: a non-UTF-8 string, pure-Python protobuf
        error = e
    if error is not None or _may_hold_opencv_blobs(msg):
        # OpenCV's FP16 fields reuse the numbers of ATC's integer fields: re-read with them.
        try:
            alt = parse_opencv_caffemodel(data)
        except (DecodeError, UnicodeDecodeError):
            alt = None
        if alt is not None and has_raw_blobs(alt):
            _LOG.info("%s: weights stored as OpenCV raw (FP16) blobs; converting to float32", path)
            check_utf8(alt, path)
            return alt
    if error is not None:
        if data.startswith(b"\x89HDF\r\n\x1a\n"):  # the HDF5 signature: Caffe's snapshot_format HDF5
            raise WeightsError(f"{path}: an HDF5 file (Caffe's snapshot_format: HDF5), which is not read here: "
                               "give a binary caffemodel (snapshot_format: BINARYPROTO, the default, or "
                               "net.save(path))") from None
        raise WeightsError(f"{path}: not a readable caffemodel (truncated, or not a Caffe binary "
                           f"NetParameter): {error}") from None
    if not len(msg.layer) and not len(msg.layers) and len(data):
        raise WeightsError(f"{path}: holds no layers: is it a caffemodel?")
    check_utf8(msg, path)
    return msg


def _may_hold_opencv_blobs(net) -> bool:
    if "uint64_data" not in caffe_pb().BlobProto.DESCRIPTOR.fields_by_name:  # a user's caffe.proto without it
        return False
    return any(len(b.uint64_data) and not len(b.data) and not len(b.double_data)
               for layers in (net.layer, net.layers) for layer in layers for b in layer.blobs)


def write_prototxt(msg, path) -> None:
    with atomic_output(path, "w") as f:
        f.write(message_text(msg))


def write_caffemodel(msg, path) -> None:
    with atomic_output(path, "wb") as f:
        f.write(msg.SerializeToString())
