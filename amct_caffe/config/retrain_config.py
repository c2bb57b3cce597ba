"""The quantization-aware training (retrain) config: the JSON of the guide's 量化感知训练 > 量化配置.

File layout (layer keys are layer names of the model; every field optional)::

    {
        "version": 1,                                  # only 1
        "<layer>": {
            "retrain_enable": true,                    # retrain this layer with fake quantization
            "retrain_data_config": {                   # its input activation, ULQ
                "algo": "ulq_quantize",                # only ulq_quantize
                "clip_max": 3.0,                       # > 0: the clip range's start value instead of IFMR
                "clip_min": -3.0,                      # < 0
                "fixed_min": true,                     # hold clip_min at 0; absent: true after a ReLU
                "num_bits": 8},                        # [8, 16]
            "retrain_weight_config": {                 # its weights, ARQ recomputed every forward
                "algo": "arq_retrain",                 # only arq_retrain
                "channel_wise": true,                  # InnerProduct: false only
                "num_bits": 8}}                        # 8 only
    }

Clip values. ULQ learns ``clip_max`` / ``clip_min`` during training. Their start values come from
IFMR on the first training batch unless the config gives them: ``clip_max`` and ``clip_min``
together, or ``clip_max`` alone where the lower clip is held at 0 (``fixed_min: true``, or
``fixed_min`` absent on a layer whose input is a ReLU's output). Giving only one bound otherwise
would leave the other without a start value, and ``clip_min`` with ``fixed_min: true`` contradicts
itself; both are errors. Absent ``fixed_min`` is decided from the graph (:func:`follows_relu`), except
that a given ``clip_min`` is kept: the lower clip then starts there and is learned.

Which layers: Convolution (DepthwiseConv for a depthwise one), Deconvolution and InnerProduct with
weights, one input and one output: the layers the RetrainWeightQuant layer supports. A grouped
Deconvolution's output channels are not rows of its weight blob, so it takes ``channel_wise:
false`` only, as InnerProduct does.

The simple retrain config (.cfg, ``config_defination``) and the generated config: :mod:`.retrain_cfg`.

Reading checks types and ranges and rejects unknown fields, naming the file, layer and field;
:func:`bind_retrain_config` checks a config against a model. Writing is atomic.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np


from amct_caffe.config import checks as C
from amct_caffe.config.layer_types import cannot_quantize_reason, config_type
from amct_caffe.config.quant_config import layer_where
from amct_caffe.errors import ConfigError
from amct_caffe.io.files import atomic_output, read_text

_LOG = logging.getLogger(__name__)

DATA_ALGOS = ("ulq_quantize",)
WEIGHT_ALGOS = ("arq_retrain",)
RETRAIN_NUM_BITS_W = 8  # table 11: weights are quantized to 8 bit only
RETRAINABLE_TYPES = ("Convolution", "DepthwiseConv", "Deconvolution", "InnerProduct")
CLIP_MAX = C.Interval(0, math.inf, True, True, "clip_max > 0")
CLIP_MIN = C.Interval(-math.inf, 0, True, True, "clip_min < 0")


def _clip_max_alone(where: str, prefix: str, why: str = "") -> ConfigError:
    return C.fail(where, f"{prefix}clip_max is given without clip_min{why}: give clip_min (< 0) too, or set "
                         "fixed_min true (lower clip 0), or give neither (IFMR then finds them)")


def follows_relu(graph, node) -> bool:
    """Whether ``node``'s input is a plain ReLU's output (no negative slope): where an absent ``fixed_min``
    holds the lower clip at 0."""
    producer = graph.producer(node.bottoms[0])
    if producer is None or producer.type != "ReLU":
        return False
    return producer.layer_param is None or float(producer.layer_param.relu_param.negative_slope) == 0.0


def _finite32(where: str, name: str, value: float) -> None:
    if not (math.isfinite(value) and abs(value) <= C.FLOAT32_MAX):
        raise C.fail(where, f"{name} {C.show(value)} is out of range: it must be a finite float32 "
                            f"(at most {C.FLOAT32_MAX:.7g} in magnitude)")


@dataclass(frozen=True)
class RetrainDataConfig:
    """ULQ settings of a layer's input; ``None`` fields are absent from the file."""

    algo: str = "ulq_quantize"
    clip_max: float | None = None
    clip_min: float | None = None
    fixed_min: bool | None = None
    num_bits: int = 8

    KEYS: ClassVar[tuple[str, ...]] = ("algo", "clip_max", "clip_min", "fixed_min", "num_bits")

    @property
    def ifmr_init(self) -> bool:
        """True when IFMR gives the clip range's start values (the config gives none)."""
        return self.clip_max is None

    def validate(self, where: str, prefix: str = "retrain_data_config.") -> None:
        C.one_of(where, prefix + "algo", self.algo, DATA_ALGOS)
        C.in_range(where, prefix + "num_bits", self.num_bits, C.ACT_NUM_BITS)
        for name, value, interval in (("clip_max", self.clip_max, CLIP_MAX), ("clip_min", self.clip_min, CLIP_MIN)):
            if value is not None:
                _finite32(where, prefix + name, value)
                C.in_range(where, prefix + name, value, interval)
        if self.fixed_min and self.clip_min is not None:
            raise C.fail(where, f"{prefix}clip_min {C.show(self.clip_min)} contradicts fixed_min true (which holds "
                                "the lower clip at 0): remove one of them")
        if self.clip_min is not None and self.clip_max is None:
            raise C.fail(where, f"{prefix}clip_min is given without clip_max: give both start values, or neither "
                                "(IFMR then finds them)")
        if self.clip_max is not None and self.clip_min is None and self.fixed_min is False:
            raise _clip_max_alone(where, prefix)
        span = None if self.clip_max is None or self.clip_min is None else float(self.clip_max) - float(self.clip_min)
        if span is not None and not span <= float(np.finfo(np.float32).max):
            raise C.fail(where, f"{prefix}clip_max - clip_min ({C.show(self.clip_max)} - {C.show(self.clip_min)}) "
                                "overflows float32: the quantization step would be infinite; give a narrower range")

    def resolved(self, after_relu: bool, where: str, prefix: str = "retrain_data_config.",
                 warn: bool = True) -> RetrainDataConfig:
        """This config with ``fixed_min`` decided for a layer whose input is (``after_relu``) or is not a
        plain ReLU's output: absent, it holds the lower clip at 0 after a ReLU unless ``clip_min`` is given.
        ``warn``: say so where fixed_min is true after something else (the config's check, naming its file)."""
        if self.fixed_min is not None:
            if warn and self.fixed_min and not after_relu:  # (the guide's table: fixed_min true only after a ReLU)
                _LOG.warning("%s: %sfixed_min is true but the layer's input is not a ReLU's output: its negative "
                             "values are clipped to 0; the guide keeps fixed_min for inputs after a ReLU", where,
                             prefix)
            return self
        fixed = after_relu and self.clip_min is None
        if self.clip_max is not None and self.clip_min is None and not fixed:
            raise _clip_max_alone(where, prefix, " and the layer's input is not a ReLU's output")
        return replace(self, fixed_min=fixed)

    def to_dict(self) -> dict:
        d: dict = {"algo": self.algo}
        for name in ("clip_max", "clip_min", "fixed_min"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        d["num_bits"] = self.num_bits
        return d

    @classmethod
    def from_dict(cls, d, where: str) -> RetrainDataConfig:
        ctx = f"{where}: retrain_data_config" if where else "retrain_data_config"
        if not isinstance(d, dict):
            raise C.fail(where, f"retrain_data_config must be an object, got {C.show(d)}")
        C.reject_unknown(d, cls.KEYS, ctx)
        config = cls(algo=C.get_typed(d, "algo", str, ctx, "ulq_quantize"),
                     clip_max=C.get_typed(d, "clip_max", float, ctx, None),
                     clip_min=C.get_typed(d, "clip_min", float, ctx, None),
                     fixed_min=C.get_typed(d, "fixed_min", bool, ctx, None),
                     num_bits=C.get_typed(d, "num_bits", int, ctx, 8))
        config.validate(where)
        return config


@dataclass(frozen=True)
class RetrainWeightConfig:
    """ARQ-retrain settings of a layer's weights."""

    algo: str = "arq_retrain"
    channel_wise: bool = True
    num_bits: int = RETRAIN_NUM_BITS_W

    KEYS: ClassVar[tuple[str, ...]] = ("algo", "channel_wise", "num_bits")

    def validate(self, where: str, prefix: str = "retrain_weight_config.") -> None:
        C.one_of(where, prefix + "algo", self.algo, WEIGHT_ALGOS)
        if self.num_bits != RETRAIN_NUM_BITS_W:
            raise C.fail(where, f"{prefix}num_bits {C.show(self.num_bits)} is out of range: weight quantization "
                                f"supports only {RETRAIN_NUM_BITS_W}")

    def to_dict(self) -> dict:
        return {"algo": self.algo, "channel_wise": self.channel_wise, "num_bits": self.num_bits}

    @classmethod
    def from_dict(cls, d, where: str) -> RetrainWeightConfig:
        ctx = f"{where}: retrain_weight_config" if where else "retrain_weight_config"
        if not isinstance(d, dict):
            raise C.fail(where, f"retrain_weight_config must be an object, got {C.show(d)}")
        C.reject_unknown(d, cls.KEYS, ctx)
        config = cls(algo=C.get_typed(d, "algo", str, ctx, "arq_retrain"),
                     channel_wise=C.get_typed(d, "channel_wise", bool, ctx, True),
                     num_bits=C.get_typed(d, "num_bits", int, ctx, RETRAIN_NUM_BITS_W))
        config.validate(where)
        return config


@dataclass(frozen=True)
class RetrainLayerConfig:
    retrain_enable: bool = True
    retrain_data_config: RetrainDataConfig = field(default_factory=RetrainDataConfig)
    retrain_weight_config: RetrainWeightConfig = field(default_factory=RetrainWeightConfig)

    KEYS: ClassVar[tuple[str, ...]] = ("retrain_enable", "retrain_data_config", "retrain_weight_config")

    def validate(self, where: str) -> None:
        if not isinstance(self.retrain_enable, bool):
            raise C.fail(where, f"retrain_enable must be true or false, got {C.show(self.retrain_enable)}")
        self.retrain_data_config.validate(where)
        self.retrain_weight_config.validate(where)

    def to_dict(self) -> dict:
        return {"retrain_enable": self.retrain_enable, "retrain_data_config": self.retrain_data_config.to_dict(),
                "retrain_weight_config": self.retrain_weight_config.to_dict()}

    @classmethod
    def from_dict(cls, d, where: str) -> RetrainLayerConfig:
        C.reject_unknown(d, cls.KEYS, where)
        data, weight = d.get("retrain_data_config"), d.get("retrain_weight_config")
        return cls(retrain_enable=C.get_typed(d, "retrain_enable", bool, where, True),
                   retrain_data_config=(RetrainDataConfig() if data is None
                                        else RetrainDataConfig.from_dict(data, where)),
                   retrain_weight_config=(RetrainWeightConfig() if weight is None
                                          else RetrainWeightConfig.from_dict(weight, where)))


@dataclass
class RetrainConfig:
    """The whole retrain config: ``layers`` maps layer names to their entries, in model order."""

    version: int = 1
    layers: dict[str, RetrainLayerConfig] = field(default_factory=dict)

    def retrained_layers(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.retrain_enable]

    def validate(self, where: str = "") -> None:
        C.one_of(where, "version", self.version, C.VERSIONS)
        for name, layer in self.layers.items():
            if name == "version":
                raise C.fail(where, "a layer named 'version' cannot be configured (the key is the config's version)")
            layer.validate(layer_where(where, name))

    def to_dict(self) -> dict:
        d: dict = {"version": self.version}
        d.update((name, layer.to_dict()) for name, layer in self.layers.items())
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=4, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d, where: str = "") -> RetrainConfig:
        if not isinstance(d, dict):
            raise C.fail(where, f"the retrain config must be a JSON object, got {C.show(d)}")
        layers = {}
        for key, value in d.items():
            if key == "version":
                continue
            if not isinstance(value, dict):
                raise C.fail(where, f"unknown field '{key}': not 'version', and not a layer (a layer's entry is an "
                                    f"object, got {C.show(value)})")
            layers[key] = RetrainLayerConfig.from_dict(value, layer_where(where, key))
        config = cls(version=C.get_typed(d, "version", int, where, 1), layers=layers)
        config.validate(where)
        return config

    @classmethod
    def from_json(cls, text: str, where: str = "") -> RetrainConfig:
        return cls.from_dict(C.load_config_json(text, where, "retrain config"), where)


def read_retrain_config(path) -> RetrainConfig:
    """Parse and check a retrain config JSON file (model-independent checks; see :func:`bind_retrain_config`)."""
    return RetrainConfig.from_json(read_text(path, "retrain config", ConfigError), str(path))


def write_retrain_config(config: RetrainConfig, path) -> None:
    """Check ``config`` and write it to ``path`` atomically."""
    config.validate()
    with atomic_output(path, "wb") as f:
        f.write(config.to_json().encode("utf-8"))


# ------------------------------------------------------------------------------ the model's layers
def retrain_reason(node, graph=None) -> str | None:
    """Why ``node`` cannot be retrained, or None if it can (its config type is retrainable)."""
    kind = config_type(node, graph)
    if kind not in RETRAINABLE_TYPES:
        return f"{kind} is not one of the retrainable types {', '.join(RETRAINABLE_TYPES)}"
    if not node.params:
        return "the caffemodel holds no weights for it"
    if len(node.bottoms) != 1 or len(node.tops) != 1:
        return f"it has {len(node.bottoms)} inputs and {len(node.tops)} outputs (one of each is required)"
    ndim = node.params[0].ndim
    if ndim != (2 if kind == "InnerProduct" else 4):
        return f"its weight has {ndim} axes; the RetrainWeightQuant layer takes 2-D (InnerProduct) or 4-D weights"
    shapes = cannot_quantize_reason(node, graph)  # an input or output of fewer than 2 axes, as PTQ refuses
    if shapes is not None:
        return shapes
    if graph is not None and node.name in graph.phase_twins:
        return ("the prototxt defines it twice under one name (a copy per phase): a retrained layer must be defined "
                "once; give both phases one layer to retrain it")
    if graph is not None and graph.train_layers is not None and node.name not in graph.train_layers:
        return ("it exists only in the TEST phase: a solver trains the TRAIN net, whose snapshots hold no weights "
                "for it")
    params = node.layer_param.param if node.layer_param is not None else ()
    if len(params) and params[0].name and _named_elsewhere(params[0].name, node, graph):
        return (f"it shares its weight with other layers (param name '{params[0].name}'), and a shared weight "
                "cannot be retrained for one layer alone")
    return None


def _named_elsewhere(name: str, node, graph) -> bool:
    """Whether a layer other than ``node`` (a copy of it for another phase does not count) names a param ``name``;
    without the graph, assume so."""
    if graph is None:
        return True
    return any(other.name != node.name and other.layer_param is not None
               and any(p.name == name for p in other.layer_param.param) for other in graph.nodes)


def per_tensor_only(node, graph=None) -> bool:
    """InnerProduct, and a grouped Deconvolution (its output channels are not rows of the weight blob)."""
    kind = config_type(node, graph)
    if kind == "InnerProduct":
        return True
    return kind == "Deconvolution" and int(node.layer_param.convolution_param.group) > 1


def retrainable_nodes(graph, log_skipped: bool = True) -> list[tuple[object, str]]:
    """``(node, config type)`` of every layer the retrain config may cover, in model order."""
    found = []
    for node in graph.nodes:
        kind = config_type(node, graph)
        if kind not in RETRAINABLE_TYPES:
            continue
        reason = retrain_reason(node, graph)
        if reason is not None:
            if log_skipped:
                _LOG.info("layer '%s' (%s) cannot be retrained and is left out of the retrain config: %s",
                          node.name, kind, reason)
            continue
        found.append((node, kind))
    return found


def default_retrain_layer(node, graph=None) -> RetrainLayerConfig:
    """The generated entry (the guide's sample): enabled, ULQ 8 bit, ARQ 8 bit per channel if allowed."""
    return RetrainLayerConfig(retrain_weight_config=RetrainWeightConfig(channel_wise=not per_tensor_only(node, graph)))


def bind_retrain_config(config: RetrainConfig, graph, where: str = "") -> RetrainConfig:
    """Check ``config`` against ``graph``; returns a copy with its layers in model order.

    Every layer must be a retrainable layer of the model (module doc); InnerProduct and grouped
    Deconvolution take ``channel_wise: false`` only.
    """
    config.validate(where)
    by_name = {}
    for node in graph.nodes:
        by_name.setdefault(node.name, node)
    for name in config.layers:
        node = by_name.get(name)
        if node is None:
            raise C.fail(where, f"layer '{name}' is in the retrain config but not in the model")
        reason = retrain_reason(node, graph)
        if reason is not None:
            raise C.fail(layer_where(where, name), f"cannot be retrained: {reason}; remove it from the config")
        config.layers[name].retrain_data_config.resolved(follows_relu(graph, node), layer_where(where, name))
        if config.layers[name].retrain_weight_config.channel_wise and per_tensor_only(node, graph):
            kind = config_type(node, graph)
            what = "grouped Deconvolution" if kind == "Deconvolution" else kind
            raise C.fail(f"{layer_where(where, name)} ({kind})",
                         f"retrain_weight_config.channel_wise true is not supported: {what} supports only "
                         "channel_wise false")
    layers = {n.name: config.layers[n.name] for n in graph.nodes if n.name in config.layers}
    return replace(config, layers=layers)
