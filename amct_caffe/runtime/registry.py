"""The one layer-type registry: Caffe type string -> what the tool can do with that type.

Each entry (:class:`TypeInfo`) records the executor class (``@register``) and, where the user
guide's 支持量化的算子列表 lists the type, how it can be quantized (``declare_quantizable``).
Registering an executor class twice is an error; asking the executor for an unknown type
lists the known ones (Caffe's LayerRegistry behaves the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

from amct_caffe.errors import UnsupportedLayerError

WEIGHTS_AND_DATA = "weights_and_data"
DATA_ONLY = "data_only"


@dataclass
class TypeInfo:
    name: str
    layer_cls: type | None = None
    quant: str | None = None          # WEIGHTS_AND_DATA, DATA_ONLY or None
    quant_by_default: bool = False    # on in a generated config, or only when the user enables it
    # Inputs that carry activations to quantize (None: all). ROI boxes, shape references... stay float.
    quant_inputs: tuple[int, ...] | None = None


_TYPES: dict[str, TypeInfo] = {}


def _info(name: str) -> TypeInfo:
    return _TYPES.setdefault(name, TypeInfo(name))


def register(*type_names: str):
    """Class decorator: ``@register("ReLU")`` makes the class the executor's ReLU."""

    def deco(cls):
        for name in type_names:
            info = _info(name)
            if info.layer_cls is not None:
                raise RuntimeError(f"layer type {name!r} registered twice "
                                   f"({info.layer_cls.__qualname__} and {cls.__qualname__})")
            info.layer_cls = cls
        cls.type_names = tuple(type_names)
        return cls

    return deco


def declare_quantizable(type_name: str, kind: str, by_default: bool = True,
                        inputs: tuple[int, ...] | None = None) -> None:
    """Record that ``type_name`` can be quantized (``kind``: WEIGHTS_AND_DATA or DATA_ONLY).

    ``inputs`` lists the bottoms that carry activations (default: all of them).
    """
    if kind not in (WEIGHTS_AND_DATA, DATA_ONLY):
        raise ValueError(f"unknown quantization kind {kind!r}")
    info = _info(type_name)
    if info.quant is not None:
        raise RuntimeError(f"quantization of layer type {type_name!r} declared twice")
    info.quant, info.quant_by_default, info.quant_inputs = kind, by_default, inputs


def _ensure_loaded() -> None:
    # Importing these registers every executor layer and the guide's quantizable-type table.
    import amct_caffe.config.layer_types  # noqa: F401
    import amct_caffe.runtime.layers  # noqa: F401


def layer_class(type_name: str, layer_name: str = "?"):
    _ensure_loaded()
    info = _TYPES.get(type_name)
    if info is None or info.layer_cls is None:
        raise UnsupportedLayerError(
            f"layer '{layer_name}' has type '{type_name}', which the embedded executor does not "
            f"support (known types: {', '.join(known_types())})")
    return info.layer_cls


def known_types() -> list[str]:
    """Types the executor can run."""
    _ensure_loaded()
    return sorted(n for n, i in _TYPES.items() if i.layer_cls is not None)


def type_info(type_name: str) -> TypeInfo | None:
    _ensure_loaded()
    return _TYPES.get(type_name)


def all_type_infos() -> dict[str, TypeInfo]:
    _ensure_loaded()
    return dict(_TYPES)
