"""The post-training quantization config (the JSON of the guide's 量化配置), as typed dataclasses.

File layout (every key optional; ``layer`` keys are the ORIGINAL layer names of the model)::

    {
        "version": 1,                      # only 1
        "batch_num": 2,                    # integer > 0
        "activation_offset": true,         # asymmetric (true) / symmetric (false) activations
        "joint_quant": false,              # in create_quant_config's sample; only false is supported
        "do_fusion": true,                 # BN fusion on
        "skip_fusion_layers": ["conv1"],   # layers kept out of BN fusion
        "update_bn": true,                 # refresh BN statistics after weight quantization
        "bn_update_config": {"bn_moving_average_fraction": 0.5,   # (0, 1.0)
                             "bn_update_iterations": 30,          # (0, 1000)
                             "bn_dump_dir": "tmp/bn_data"},
        "<layer>": {
            "quant_enable": true,
            "activation_quant_params": {
                "num_bits": 8,                        # [8, 16]
                "max_percentile": 0.999999,           # (0.5, 1.0]
                "min_percentile": 0.999999,           # (0.5, 1.0]
                "search_range": [0.7, 1.3],           # 0 < start < end
                "search_step": 0.01,                  # (0, end - start]
                "with_offset": true},                 # optional; absent -> activation_offset
            "weight_quant_params": {                  # layers with weights only
                "wts_algo": "arq_quantize",           # or "snq_quantize"
                "channel_wise": true,                 # InnerProduct / LSTM / RNN / GRU: false only
                "num_bits": 8,                        # arq: 8 only; snq: 4 only
                "max_iteration": 1000,                # snq only, [500, 2000]
                "min_distance": 1e-10,                # snq only, [1e-10, 1e-3]
                "init_algo": "uniform"}}              # snq only: uniform | gaussian | d2sampling
    }

Reading checks every type and every range that does not depend on the model, and rejects unknown
fields naming them; checks that need the layer types live in :mod:`.binding`. Writing is atomic.
The guide's SNQ sample writes ``activation_quant_params`` as a one-element list; that form is
read too, and always written back as an object. Duplicate keys are an error (the guide asks for
unique layer names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar, Union

from amct_caffe.config import checks as C
from amct_caffe.errors import ConfigError
from amct_caffe.io.files import atomic_output, read_text


@dataclass(frozen=True)
class ActivationQuantParams:
    """IFMR settings of one layer's input; ``with_offset`` None follows the global activation_offset."""

    num_bits: int = 8
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01
    with_offset: bool | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("num_bits", "max_percentile", "min_percentile", "search_range",
                                       "search_step", "with_offset")

    def validate(self, where: str, prefix: str = "activation_quant_params.") -> None:
        C.in_range(where, prefix + "num_bits", self.num_bits, C.ACT_NUM_BITS)
        C.in_range(where, prefix + "max_percentile", self.max_percentile, C.PERCENTILE)
        C.in_range(where, prefix + "min_percentile", self.min_percentile, C.PERCENTILE)
        C.check_search(where, prefix, self.search_range[0], self.search_range[1], self.search_step)

    def to_dict(self) -> dict:
        d = {"num_bits": self.num_bits, "max_percentile": self.max_percentile,
             "min_percentile": self.min_percentile, "search_range": list(self.search_range),
             "search_step": self.search_step}
        if self.with_offset is not None:
            d["with_offset"] = self.with_offset
        return d

    @classmethod
    def from_dict(cls, d, where: str) -> ActivationQuantParams:
        ctx = f"{where}: activation_quant_params" if where else "activation_quant_params"
        if isinstance(d, list) and len(d) == 1:
            d = d[0]  # the guide's SNQ sample wraps the object in a list
        if not isinstance(d, dict):
            raise C.fail(where, f"activation_quant_params must be an object, got {C.show(d)}")
        C.reject_unknown(d, cls.KEYS, ctx)
        rng = d.get("search_range", [0.7, 1.3])
        if (not isinstance(rng, list) or len(rng) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)):
            raise C.fail(ctx, f"search_range must be a list of two numbers [start, end], got {C.show(rng)}")
        params = cls(num_bits=C.get_typed(d, "num_bits", int, ctx, 8),
                     max_percentile=C.get_typed(d, "max_percentile", float, ctx, 0.999999),
                     min_percentile=C.get_typed(d, "min_percentile", float, ctx, 0.999999),
                     search_range=(C.to_float(rng[0], "search_range", ctx), C.to_float(rng[1], "search_range", ctx)),
                     search_step=C.get_typed(d, "search_step", float, ctx, 0.01),
                     with_offset=C.get_typed(d, "with_offset", bool, ctx, None))
        params.validate(where)
        return params


@dataclass(frozen=True)
class ArqParams:
    """Uniform (ARQ) weight quantization: symmetric, 8 bit, per output channel or per tensor."""

    channel_wise: bool = True
    num_bits: int = C.ARQ_NUM_BITS

    wts_algo: ClassVar[str] = "arq_quantize"
    KEYS: ClassVar[tuple[str, ...]] = ("wts_algo", "channel_wise", "num_bits")

    def validate(self, where: str, prefix: str = "weight_quant_params.") -> None:
        if self.num_bits != C.ARQ_NUM_BITS:
            raise C.fail(where, f"{prefix}num_bits {C.show(self.num_bits)} is out of range for arq_quantize: "
                                f"uniform weight quantization supports only {C.ARQ_NUM_BITS}")

    def to_dict(self) -> dict:
        return {"wts_algo": self.wts_algo, "channel_wise": self.channel_wise, "num_bits": self.num_bits}


@dataclass(frozen=True)
class SnqParams:
    """Non-uniform (SNQ) INT4 weight quantization: k-means of each channel's weights into 16 levels."""

    channel_wise: bool = True
    num_bits: int = C.SNQ_NUM_BITS
    max_iteration: int = 1000
    min_distance: float = 1e-10
    init_algo: str = "uniform"

    wts_algo: ClassVar[str] = "snq_quantize"
    KEYS: ClassVar[tuple[str, ...]] = ("wts_algo", "channel_wise", "num_bits", "max_iteration",
                                       "min_distance", "init_algo")

    def validate(self, where: str, prefix: str = "weight_quant_params.") -> None:
        if self.num_bits != C.SNQ_NUM_BITS:
            raise C.fail(where, f"{prefix}num_bits {C.show(self.num_bits)} is out of range for snq_quantize: "
                                f"non-uniform weight quantization supports only {C.SNQ_NUM_BITS}")
        C.in_range(where, prefix + "max_iteration", self.max_iteration, C.MAX_ITERATION)
        C.in_range(where, prefix + "min_distance", self.min_distance, C.MIN_DISTANCE)
        C.one_of(where, prefix + "init_algo", self.init_algo, C.INIT_ALGOS)

    def to_dict(self) -> dict:
        return {"wts_algo": self.wts_algo, "channel_wise": self.channel_wise, "num_bits": self.num_bits,
                "max_iteration": self.max_iteration, "min_distance": self.min_distance,
                "init_algo": self.init_algo}


WeightQuantParams = Union[ArqParams, SnqParams]


def weight_params_from_dict(d, where: str) -> WeightQuantParams:
    ctx = f"{where}: weight_quant_params" if where else "weight_quant_params"
    if not isinstance(d, dict):
        raise C.fail(where, f"weight_quant_params must be an object, got {C.show(d)}")
    algo = C.get_typed(d, "wts_algo", str, ctx, "arq_quantize")
    C.one_of(ctx, "wts_algo", algo, C.WTS_ALGOS)
    if algo == "arq_quantize":
        snq_only = [k for k in d if k in SnqParams.KEYS and k not in ArqParams.KEYS]
        if snq_only:
            raise C.fail(ctx, f"{', '.join(repr(k) for k in snq_only)} apply only to "
                              'wts_algo "snq_quantize"')
        C.reject_unknown(d, ArqParams.KEYS, ctx)
        params = ArqParams(channel_wise=C.get_typed(d, "channel_wise", bool, ctx, True),
                           num_bits=C.get_typed(d, "num_bits", int, ctx, C.ARQ_NUM_BITS))
    else:
        C.reject_unknown(d, SnqParams.KEYS, ctx)
        params = SnqParams(channel_wise=C.get_typed(d, "channel_wise", bool, ctx, True),
                           num_bits=C.get_typed(d, "num_bits", int, ctx, C.SNQ_NUM_BITS),
                           max_iteration=C.get_typed(d, "max_iteration", int, ctx, 1000),
                           min_distance=C.get_typed(d, "min_distance", float, ctx, 1e-10),
                           init_algo=C.get_typed(d, "init_algo", str, ctx, "uniform"))
    params.validate(where)
    return params


@dataclass
class LayerQuantConfig:
    """One layer's entry. ``weight_quant_params`` is None for data-only layers (and, before
    :func:`~amct_caffe.config.binding.bind_to_graph`, where the file left it out)."""

    quant_enable: bool = True
    activation_quant_params: ActivationQuantParams = field(default_factory=ActivationQuantParams)
    weight_quant_params: WeightQuantParams | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("quant_enable", "activation_quant_params", "weight_quant_params")

    def validate(self, where: str) -> None:
        self.activation_quant_params.validate(where)
        if self.weight_quant_params is not None:
            self.weight_quant_params.validate(where)

    def to_dict(self) -> dict:
        d = {"quant_enable": self.quant_enable,
             "activation_quant_params": self.activation_quant_params.to_dict()}
        if self.weight_quant_params is not None:
            d["weight_quant_params"] = self.weight_quant_params.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> LayerQuantConfig:
        C.reject_unknown(d, cls.KEYS, where)
        acts = d.get("activation_quant_params")
        wts = d.get("weight_quant_params")
        return cls(quant_enable=C.get_typed(d, "quant_enable", bool, where, True),
                   activation_quant_params=(ActivationQuantParams() if acts is None
                                            else ActivationQuantParams.from_dict(acts, where)),
                   weight_quant_params=None if wts is None else weight_params_from_dict(wts, where))


@dataclass(frozen=True)
class BnUpdateConfig:
    """How BN statistics are refreshed when update_bn is on (defaults: the guide's recommendations).

    ``bn_dump_dir`` need not exist yet: the guide's recommended value is a directory the tool creates.
    """

    bn_moving_average_fraction: float = 0.5
    bn_update_iterations: int = 30
    bn_dump_dir: str = "tmp/bn_data"

    KEYS: ClassVar[tuple[str, ...]] = ("bn_moving_average_fraction", "bn_update_iterations", "bn_dump_dir")

    def validate(self, where: str) -> None:
        prefix = "bn_update_config."
        C.in_range(where, prefix + "bn_moving_average_fraction", self.bn_moving_average_fraction,
                   C.BN_FRACTION)
        C.in_range(where, prefix + "bn_update_iterations", self.bn_update_iterations, C.BN_ITERATIONS)
        if not self.bn_dump_dir:
            raise C.fail(where, f"{prefix}bn_dump_dir must be a directory path, got \"\"")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_dict(cls, d, where: str) -> BnUpdateConfig:
        ctx = f"{where}: bn_update_config" if where else "bn_update_config"
        if not isinstance(d, dict):
            raise C.fail(where, f"bn_update_config must be an object, got {C.show(d)}")
        C.reject_unknown(d, cls.KEYS, ctx)
        cfg = cls(bn_moving_average_fraction=C.get_typed(d, "bn_moving_average_fraction", float, ctx, 0.5),
                  bn_update_iterations=C.get_typed(d, "bn_update_iterations", int, ctx, 30),
                  bn_dump_dir=C.get_typed(d, "bn_dump_dir", str, ctx, "tmp/bn_data"))
        cfg.validate(where)
        return cfg


GLOBAL_KEYS = ("version", "batch_num", "activation_offset", "joint_quant", "do_fusion", "skip_fusion_layers",
               "update_bn", "bn_update_config")


def layer_where(where: str, name: str) -> str:
    return f"{where}: layer '{name}'" if where else f"layer '{name}'"


@dataclass
class QuantConfig:
    """The whole config: global options plus ``layers`` (original layer name -> entry, model order)."""

    version: int = 1
    batch_num: int = 1
    activation_offset: bool = True
    joint_quant: bool = False
    do_fusion: bool = True
    skip_fusion_layers: list[str] = field(default_factory=list)
    update_bn: bool = False
    bn_update_config: BnUpdateConfig | None = None
    layers: dict[str, LayerQuantConfig] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    def quantized_layers(self) -> list[str]:
        """Names of the layers with quant_enable true, in config order."""
        return [name for name, layer in self.layers.items() if layer.quant_enable]

    def with_offset(self, name: str) -> bool:
        """Whether layer ``name``'s activations get an offset (its own with_offset, else the global one)."""
        own = self.layers[name].activation_quant_params.with_offset
        return self.activation_offset if own is None else own

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "") -> None:
        """Every model-independent range of the guide's tables."""
        C.one_of(where, "version", self.version, C.VERSIONS)
        if isinstance(self.batch_num, bool) or not isinstance(self.batch_num, int):
            raise C.fail(where, f"batch_num must be an integer, got {C.show(self.batch_num)}")
        C.in_range(where, "batch_num", self.batch_num, C.BATCH_NUM)
        C.check_uint32(where, "batch_num", self.batch_num)
        for name, value in (("activation_offset", self.activation_offset), ("do_fusion", self.do_fusion),
                            ("update_bn", self.update_bn), ("joint_quant", self.joint_quant)):
            if not isinstance(value, bool):
                raise C.fail(where, f"{name} must be true or false, got {C.show(value)}")
        if self.joint_quant:
            raise C.fail(where, "joint_quant true is not supported (only false)")
        if len(set(self.skip_fusion_layers)) != len(self.skip_fusion_layers):
            raise C.fail(where, f"skip_fusion_layers lists a layer twice: {C.show(self.skip_fusion_layers)}")
        if self.bn_update_config is not None:
            self.bn_update_config.validate(where)
        for name in self.layers:
            if name in GLOBAL_KEYS:
                raise C.fail(where, f"layer '{name}' has the name of a global option and cannot be "
                                    "configured")
            self.layers[name].validate(layer_where(where, name))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The file's content, keys in the order of create_quant_config's sample."""
        d = {"version": self.version, "batch_num": self.batch_num,
             "activation_offset": self.activation_offset, "joint_quant": self.joint_quant,
             "do_fusion": self.do_fusion,
             "skip_fusion_layers": list(self.skip_fusion_layers)}
        if self.update_bn or self.bn_update_config is not None:
            d["update_bn"] = self.update_bn
        if self.bn_update_config is not None:
            d["bn_update_config"] = self.bn_update_config.to_dict()
        for name, layer in self.layers.items():
            d[name] = layer.to_dict()
        return d

    @classmethod
    def from_dict(cls, d, where: str = "") -> QuantConfig:
        if not isinstance(d, dict):
            raise C.fail(where, f"the config must be a JSON object, got {C.show(d)}")
        skip = d.get("skip_fusion_layers", [])
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise C.fail(where, f"skip_fusion_layers must be a list of layer names, got {C.show(skip)}")
        layers = {}
        for key, value in d.items():
            if key in GLOBAL_KEYS:
                continue
            if not isinstance(value, dict):
                raise C.fail(where, f"unknown field '{key}': not a global option ({', '.join(GLOBAL_KEYS)}), "
                                    f"and not a layer (a layer's entry is an object, got {C.show(value)})")
            layers[key] = LayerQuantConfig.from_dict(value, layer_where(where, key))
        bn = d.get("bn_update_config")
        cfg = cls(version=C.get_typed(d, "version", int, where, 1),
                  batch_num=C.get_typed(d, "batch_num", int, where, 1),
                  activation_offset=C.get_typed(d, "activation_offset", bool, where, True),
                  joint_quant=C.get_typed(d, "joint_quant", bool, where, False),
                  do_fusion=C.get_typed(d, "do_fusion", bool, where, True),
                  skip_fusion_layers=list(skip),
                  update_bn=C.get_typed(d, "update_bn", bool, where, False),
                  bn_update_config=None if bn is None else BnUpdateConfig.from_dict(bn, where),
                  layers=layers)
        if cfg.update_bn and cfg.bn_update_config is None:
            cfg.bn_update_config = BnUpdateConfig()
        cfg.validate(where)
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=4, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "") -> QuantConfig:
        return cls.from_dict(C.load_config_json(text, where, "config"), where)


def read_quant_config(path) -> QuantConfig:
    """Parse and check a JSON config file (model-independent checks only; see :mod:`.binding`)."""
    return QuantConfig.from_json(read_text(path, "quantization config", ConfigError), str(path))


def write_quant_config(config: QuantConfig, path) -> None:
    """Check ``config`` and write it to ``path`` atomically (temporary file beside it, then rename)."""
    config.validate()
    text = config.to_json()
    with atomic_output(path, "wb") as f:
        f.write(text.encode("utf-8"))
