"""The one layer registry: Caffe type string -> Layer class.

Serves the executor and, through class attributes, the tables that ask "what can be done with
this type" (e.g. quantizable layers). Registering a type twice is an error; asking for an
unknown type lists the known ones (Caffe's LayerRegistry behaves the same way).
"""

from __future__ import annotations

from amct_caffe.errors import UnsupportedLayerError

_LAYERS: dict[str, type] = {}


def register(*type_names: str):
    """Class decorator: ``@register("ReLU")`` makes the class the executor's ReLU."""

    def deco(cls):
        for name in type_names:
            if name in _LAYERS:
                raise RuntimeError(f"layer type {name!r} registered twice "
                                   f"({_LAYERS[name].__qualname__} and {cls.__qualname__})")
            _LAYERS[name] = cls
        cls.type_names = tuple(type_names)
        return cls

    return deco


def _ensure_loaded() -> None:
    # Importing the package registers every layer module.
    import amct_caffe.runtime.layers  # noqa: F401


def layer_class(type_name: str, layer_name: str = "?"):
    _ensure_loaded()
    try:
        return _LAYERS[type_name]
    except KeyError:
        raise UnsupportedLayerError(
            f"layer '{layer_name}' has type '{type_name}', which the embedded executor does not "
            f"support (known types: {', '.join(sorted(_LAYERS))})") from None


def known_types() -> list[str]:
    _ensure_loaded()
    return sorted(_LAYERS)
