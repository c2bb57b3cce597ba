"""The default config of a model (what create_quant_config writes) and loading one for a model.

:func:`create_default_config` lists every layer of the model whose type is in the guide's table of
quantizable layers (DepthwiseConv for a depthwise Convolution), in model order:

* ``quant_enable`` true, except for the types the table marks 默认不量化 (ReLU, PReLU, Scale,
  BatchNorm, Bias, Clip, ...), which are listed with ``quant_enable: false`` so the user can
  switch them on;
* ``activation_quant_params`` with the guide's defaults (8 bit, percentiles 0.999999,
  search_range [0.7, 1.3], search_step 0.01; no ``with_offset``, so the global
  ``activation_offset`` applies);
* for layers with weights, ``weight_quant_params`` ARQ 8 bit, ``channel_wise`` true except for
  InnerProduct / LSTM / RNN / GRU (false: they support per-tensor scales only);
* layers of a listed type that still cannot be quantized (see
  :func:`~amct_caffe.config.layer_types.cannot_quantize_reason`) are left out with a log line.

With ``config_defination`` (a simple .cfg) the entries come from that file instead
(:mod:`.simple_cfg`), including ``batch_num`` and ``activation_offset``: the arguments of the same
names are then ignored (the guide: 此时输入参数中该参数配置不生效).
"""

from __future__ import annotations

import logging
import numbers

import numpy as np

from amct_caffe.config import checks as C
from amct_caffe.config.binding import bind_to_graph, default_layer_config, quantizable_nodes
from amct_caffe.config.quant_config import GLOBAL_KEYS, QuantConfig, read_quant_config
from amct_caffe.config.simple_cfg import config_from_simple_cfg

_LOG = logging.getLogger(__name__)


def _check_arguments(batch_num, activation_offset) -> tuple[int, bool]:
    """create_quant_config's own arguments: batch_num an integer > 0, activation_offset a bool (NumPy's
    integers and bools too, as Python's); returned as Python's."""
    if isinstance(batch_num, (bool, np.bool_)) or not isinstance(batch_num, numbers.Integral):
        raise C.fail("", f"batch_num must be an integer greater than 0, got {C.show(batch_num)}")
    batch_num = int(batch_num)
    C.in_range("", "batch_num", batch_num, C.BATCH_NUM)
    if not isinstance(activation_offset, (bool, np.bool_)):
        raise C.fail("", f"activation_offset must be true or false, got {C.show(activation_offset)}")
    return batch_num, bool(activation_offset)


def create_default_config(graph, batch_num: int = 1, activation_offset: bool = True,
                          config_defination=None) -> QuantConfig:
    """The full quantization config of ``graph`` (rules: module doc)."""
    batch_num, activation_offset = _check_arguments(batch_num, activation_offset)
    for node in graph.nodes:
        if node.name in GLOBAL_KEYS:
            raise C.fail("", f"layer '{node.name}' has the name of a global config option; rename it")
    if config_defination is not None:
        if batch_num != 1 or activation_offset is not True:
            _LOG.warning("create_quant_config: batch_num and activation_offset come from %s; the arguments "
                         "batch_num=%s, activation_offset=%s are ignored", config_defination, batch_num,
                         activation_offset)
        config = config_from_simple_cfg(config_defination, graph)
    else:
        layers = {node.name: default_layer_config(kind) for node, kind in quantizable_nodes(graph)}
        config = QuantConfig(batch_num=batch_num, activation_offset=activation_offset, layers=layers)
    if not config.quantized_layers():
        _LOG.warning("no layer of model '%s' will be quantized", graph.name)
    return bind_to_graph(config, graph)


def load_config(config_file, graph) -> QuantConfig:
    """Read a JSON config and check it against ``graph`` (what init does with its config_file)."""
    return bind_to_graph(read_quant_config(config_file), graph, str(config_file))
