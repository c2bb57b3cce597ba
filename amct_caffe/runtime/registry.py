"""The executor's view of the layer-type table (:mod:`amct_caffe.ops`).

Importing this module imports every layer module of :mod:`amct_caffe.runtime.layers`, whose
``@register`` decorators put the executor classes into the table; asking for an unknown type
lists the known ones (Caffe's LayerRegistry behaves the same way).
"""

from __future__ import annotations

import amct_caffe.runtime.layers  # noqa: F401  (registers every executor layer class)
from amct_caffe.ops import executor_class, register, registered_types

__all__ = ["known_types", "layer_class", "layer_type_list", "register"]


def layer_class(type_name: str, layer_name: str = "?") -> type:
    """The executor class of ``type_name`` (UnsupportedLayerError naming the layer if none)."""
    return executor_class(type_name, layer_name)


def known_types() -> list[str]:
    """Types the executor can run, sorted."""
    return registered_types()


layer_type_list = known_types  # pycaffe's name for it (caffe.layer_type_list())
