"""Protobuf schemas: Caffe's NetParameter & co., records and configs.

The build compiles ``proto/*.proto`` into descriptor sets (``schema.desc``,
``amct_custom.desc``) installed as data of ``amct_caffe.proto``. They are loaded into a *private*
:class:`~google.protobuf.descriptor_pool.DescriptorPool`, so pycaffe's own ``caffe_pb2``
(package ``caffe`` in the default pool) can be imported in the same process without a
"duplicate symbol" clash; our files also use the distinct package ``amct_caffe``.

A user whose models carry custom layers compiles their merged caffe.proto at run time,
through :func:`set_caffe_proto` or the ``AMCT_CAFFE_PROTO`` environment variable; the
message classes of ``caffe_pb`` then come from that file (any package name).

This module imports nothing of amct_caffe but its errors, so any module (``io`` itself included)
can import it without a cycle.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import enum_type_wrapper

from amct_caffe.errors import ModelFormatError

_LOG = logging.getLogger(__name__)
PACKAGE = "amct_caffe"
USER_PROTO_ENV = "AMCT_CAFFE_PROTO"
# Where the build installs schema.desc and amct_custom.desc (a data-only namespace package).
_DESC_PACKAGE = "amct_caffe.proto"


class Schema:
    """Message classes of one descriptor pool and package, looked up by short name.

    ``schema.NetParameter()`` builds a message; ``schema.enum_value("Phase", "TEST")`` reads a
    top-level enum (nested enum values are attributes of their message class, e.g.
    ``schema.PoolingParameter.MAX``).
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool, package: str, origin: str):
        self.pool = pool
        self.package = package
        self.origin = origin
        self._classes: dict[str, type] = {}

    def _full(self, name: str) -> str:
        return f"{self.package}.{name}" if self.package else name

    def has_message(self, name: str) -> bool:
        try:
            self.pool.FindMessageTypeByName(self._full(name))
            return True
        except KeyError:
            return False

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        cls = self._classes.get(name)
        if cls is None:
            try:
                desc = self.pool.FindMessageTypeByName(self._full(name))
            except KeyError:
                enum = self._top_level_enum(name)
                if enum is not None:
                    return enum
                raise AttributeError(f"message {name!r} is not defined in {self.origin}") from None
            cls = message_factory.GetMessageClass(desc)
            self._classes[name] = cls
        return cls

    def _top_level_enum(self, name: str):
        """A top-level enum (``Phase``) as a generated ``_pb2`` module has it, or one of its values (``TRAIN``:
        its number); None if ``name`` is neither."""
        try:
            file = self.pool.FindFileContainingSymbol(self._full(name))
        except KeyError:
            return None
        if name in file.enum_types_by_name:
            return enum_type_wrapper.EnumTypeWrapper(file.enum_types_by_name[name])
        for enum in file.enum_types_by_name.values():
            if name in enum.values_by_name:
                return enum.values_by_name[name].number
        return None

    def enum_value(self, enum: str, value: str) -> int:
        return self.pool.FindEnumTypeByName(self._full(enum)).values_by_name[value].number


def _pool_from_file_set(data: bytes) -> descriptor_pool.DescriptorPool:
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    return pool


def _load_desc(name: str) -> bytes:
    """The bytes of the build's ``<name>.desc``.

    ``amct_caffe/proto`` is a data-only namespace package: with the root package's extended
    ``__path__`` it spans a source checkout (first) and the installed build, so a checkout run after
    ``pip install .`` still finds the descriptor sets that only the build makes.
    """
    try:
        path = resources.files(_DESC_PACKAGE).joinpath(f"{name}.desc")
        if path.is_file():
            return path.read_bytes()
    except ModuleNotFoundError:   # no amct_caffe/proto directory at all: nothing was built
        pass
    raise ModelFormatError(
        f"compiled schema {name}.desc is missing from {_DESC_PACKAGE}: amct_caffe was not installed by "
        "its build (run `pip install .` from the source tree)")


def compile_proto(proto_file: str | os.PathLike) -> bytes:
    """Compile a .proto file to a serialized FileDescriptorSet (imports included).

    Uses grpcio-tools' bundled protoc when installed, else a ``protoc`` on PATH.
    """
    proto_file = Path(proto_file).resolve()
    if not proto_file.is_file():
        what = "is a folder, not a .proto file" if proto_file.is_dir() else "does not exist"
        raise ModelFormatError(f"proto file {proto_file} {what}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.desc"
        args = [f"-I{proto_file.parent}", "--include_imports", f"--descriptor_set_out={out}",
                str(proto_file)]
        try:
            import grpc_tools.protoc  # noqa: F401
            cmd = [sys.executable, "-m", "grpc_tools.protoc", *args]
        except ImportError:
            exe = shutil.which("protoc")
            if exe is None:
                raise ModelFormatError(
                    f"cannot compile {proto_file}: install grpcio-tools (pip install grpcio-tools) "
                    "or put protoc on PATH") from None
            cmd = [exe, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise ModelFormatError(f"protoc failed on {proto_file}:\n{res.stderr.strip()}")
        return out.read_bytes()


_records: Schema | None = None
_caffe: Schema | None = None


def _builtin_schema() -> Schema:
    pool = _pool_from_file_set(_load_desc("schema"))
    return Schema(pool, PACKAGE, "amct_caffe's caffe.proto")


def records() -> Schema:
    """Schema of scale_offset_record.proto, calibration_config.proto, retrain_config.proto."""
    global _records
    if _records is None:
        _records = _builtin_schema()
    return _records


def set_caffe_proto(proto_file: str | os.PathLike | None) -> Schema:
    """Use a user's (merged) caffe.proto for models from now on; ``None`` restores ours."""
    global _caffe
    if proto_file is None:
        _caffe = _builtin_schema()
        return _caffe
    fds = descriptor_pb2.FileDescriptorSet.FromString(compile_proto(proto_file))
    target = next(f for f in fds.file if Path(f.name).name == Path(proto_file).name)
    added = _add_integer_blob_fields(target)
    if added:
        _LOG.info("%s: BlobProto given %s, the integer blob fields of deploy models (as ATC's caffe.proto has "
                  "them)", proto_file, ", ".join(added))
    blob = next((m for m in target.message_type if m.name == "BlobProto"), None)
    lacking = [f"{name} = {number}" for name, number, kind, _ in _INTEGER_BLOB_FIELDS
               if blob is not None and not any(f.name == name and f.number == number and f.type == kind
                                               for f in blob.field)]
    if lacking:
        _LOG.warning("%s: BlobProto has no %s (their numbers are taken): deploy models, whose INT8 weights and "
                     "INT32 biases go there, cannot be written with it", proto_file, ", ".join(lacking))
    pool = _pool_from_file_set(fds.SerializeToString())
    schema = Schema(pool, target.package, str(proto_file))
    if not schema.has_message("NetParameter"):
        raise ModelFormatError(f"{proto_file} defines no NetParameter message: is it a caffe.proto?")
    missing = [m for m in _AMCT_MESSAGES if not schema.has_message(m)]
    if missing:
        _LOG.warning("%s lacks the AMCT messages %s: models with AMCT layers will not parse; "
                     "merge it with amct_custom.proto (caffe_patch/install.py) first", proto_file, missing)
    _caffe = schema
    _LOG.info("using caffe.proto %s (package %r)", proto_file, target.package)
    return schema


# BlobProto's integer fields of ATC's caffe.proto (ours has them too): a deploy model's INT8 weights, INT32 biases
# and packed DeQuant parameters
_INTEGER_BLOB_FIELDS = (("int8_data", 10, descriptor_pb2.FieldDescriptorProto.TYPE_BYTES, False),
                        ("int32_data", 11, descriptor_pb2.FieldDescriptorProto.TYPE_INT32, True),
                        ("uint64_data", 12, descriptor_pb2.FieldDescriptorProto.TYPE_UINT64, True))


def _add_integer_blob_fields(file_proto) -> list[str]:
    """Give the BlobProto of a user's caffe.proto (BVLC's lacks them) the integer fields deploy models need,
    where its names and numbers are free; returns the names added (a field of another name at one of those
    numbers leaves that one out: such models then cannot be written with that schema)."""
    blob = next((m for m in file_proto.message_type if m.name == "BlobProto"), None)
    if blob is None:
        return []
    names, numbers = {f.name for f in blob.field}, {f.number for f in blob.field}
    ranges = [(r.start, r.end) for r in blob.extension_range] + [(r.start, r.end) for r in blob.reserved_range]
    added = []
    for name, number, kind, repeated in _INTEGER_BLOB_FIELDS:
        if name in names or number in numbers or any(lo <= number < hi for lo, hi in ranges):
            continue
        field = blob.field.add(name=name, number=number, type=kind,
                               label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED if repeated
                               else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
        if repeated:
            field.options.packed = True
        added.append(name)
    return added


_AMCT_MESSAGES = ("QuantParameter", "DeQuantParameter", "IFMRParameter")  # the layers quantization writes


def require_amct_messages(what: str) -> None:
    """Refuse to start ``what`` (a quantization flow) with a caffe.proto lacking the AMCT layers it writes."""
    schema = caffe_pb()
    missing = [m for m in _AMCT_MESSAGES if not schema.has_message(m)]
    if missing:
        raise ModelFormatError(f"{schema.origin} has no {', '.join(missing)} (AMCT's layers), which {what} writes: "
                               "merge AMCT's layers into it (python -m caffe_patch.merge_proto), or go back to "
                               "amct_caffe's own (set_caffe_proto(None), AMCT_CAFFE_PROTO unset)")


def caffe_pb() -> Schema:
    """Schema of Caffe models (ours, or the user's from AMCT_CAFFE_PROTO / set_caffe_proto)."""
    global _caffe
    if _caffe is None:
        user = os.environ.get(USER_PROTO_ENV)
        if user:
            return set_caffe_proto(user)
        _caffe = _builtin_schema()
    return _caffe
