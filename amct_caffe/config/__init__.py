"""Post-training quantization config: typed JSON config, simple .cfg, defaults for a model.

The table of quantizable layer types is :mod:`amct_caffe.ops`; :mod:`.layer_types` adds the
rules that depend on a layer's parameters (DepthwiseConv, Scale / Bias limits).

* :class:`QuantConfig` / :class:`LayerQuantConfig` / :class:`ActivationQuantParams` /
  :class:`ArqParams` / :class:`SnqParams` / :class:`BnUpdateConfig`: the JSON of 量化配置;
* :func:`create_default_config` (graph -> config, optionally from a simple .cfg),
  :func:`load_config` (JSON file checked against a graph), :func:`read_quant_config` /
  :func:`write_quant_config` (file I/O, model-independent checks, atomic write);
* :func:`config_from_simple_cfg`, :func:`parse_simple_cfg`: the .cfg (AMCTConfig text proto);
* :mod:`.retrain_config`: the quantization-aware training config (:class:`RetrainConfig`,
  :func:`bind_retrain_config`); :mod:`.retrain_cfg`: its .cfg and :func:`create_retrain_config`.
"""

from amct_caffe.config import layer_types
from amct_caffe.config.binding import bind_to_graph, default_layer_config, quantizable_nodes
from amct_caffe.config.generate import create_default_config, load_config
from amct_caffe.config.layer_types import config_type, is_depthwise
from amct_caffe.config.quant_config import (ActivationQuantParams, ArqParams, BnUpdateConfig,
                                            LayerQuantConfig, QuantConfig, SnqParams, WeightQuantParams,
                                            read_quant_config, write_quant_config)
from amct_caffe.config.retrain_cfg import create_retrain_config
from amct_caffe.config.retrain_config import (RetrainConfig, RetrainDataConfig, RetrainLayerConfig,
                                              RetrainWeightConfig, bind_retrain_config, follows_relu,
                                              read_retrain_config, write_retrain_config)
from amct_caffe.config.simple_cfg import config_from_simple_cfg, parse_simple_cfg

__all__ = [
    "ActivationQuantParams", "ArqParams", "BnUpdateConfig", "LayerQuantConfig", "QuantConfig", "SnqParams",
    "WeightQuantParams", "bind_to_graph", "config_from_simple_cfg", "config_type", "create_default_config",
    "default_layer_config", "is_depthwise", "layer_types", "load_config", "parse_simple_cfg",
    "quantizable_nodes", "read_quant_config", "write_quant_config",
    "RetrainConfig", "RetrainDataConfig", "RetrainLayerConfig", "RetrainWeightConfig", "bind_retrain_config",
    "create_retrain_config", "follows_relu", "read_retrain_config", "write_retrain_config",
]
