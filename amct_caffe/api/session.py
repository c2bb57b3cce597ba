"""The quantization session behind the guide's ``graph``: load -> pipeline, with no file written.

:class:`QuantGraph` is what ``init`` returns. It holds the float model, the bound config and what
each step produced, and its methods run the pipeline's passes (:mod:`amct_caffe.passes`) in
memory. The guide's functions (:mod:`.calibration`) call them and write the files the guide
names; the embedded flows (:mod:`.workflow`, :mod:`.fallback`) call them and run the calibration
graph in the executor with the record in memory. Both therefore save identical models.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from amct_caffe import io, ops
from amct_caffe.config import load_config
from amct_caffe.errors import AmctError, GraphError
from amct_caffe.io.schema import require_amct_messages
from amct_caffe.io.bn_dump import bn_dump_path, read_bn_dump
from amct_caffe.io.graph_io import graph_from_net
from amct_caffe.io.paths import check_output, checked_path, reading, require
from amct_caffe.io.record import Record
from amct_caffe.ir import Graph
from amct_caffe.passes.calibration import calibration_graph
from amct_caffe.passes.prepare import Prepared, Stage, prepare
from amct_caffe.passes.quantized_models import QuantTarget
from amct_caffe.passes.weights import (QuantizedWeights, bn_update_settings, quantize_weights, record_weight_factors,
                                       refresh_bn_chains, weights_record)
from amct_caffe.runtime.shapes import fill_shared_weights, infer_shapes

_LOG = logging.getLogger(__name__)


def load_float_graph(model_file, weights_file) -> Graph:
    """The model as an SSA graph with its blob shapes; refuses models that are already quantized."""
    require_amct_messages("quantization")
    net, weights = io.load_model(model_file, weights_file)
    seen: set[str] = set()
    for layer in net.layer:  # Caffe runs such a net; here the config and the record name layers
        if layer.name in seen:
            raise GraphError(f"{model_file}: two layers are named '{layer.name}'; quantization names layers in its "
                             "config and record, so each name must be unique: rename one in the prototxt")
        seen.add(layer.name)
    graph = graph_from_net(net, weights)
    for node in graph.nodes:
        if ops.layer_type(node.type).inserted:
            raise AmctError(f"{model_file}: layer '{node.name}' is a {node.type} layer: the model is already "
                            "quantized; give the original float model")
        if any(np.issubdtype(p.dtype, np.integer) for p in node.params):
            raise AmctError(f"{weights_file}: layer '{node.name}' has integer weights: the model is already "
                            "quantized; give the original float model")
    infer_shapes(graph, strict=True, have_weights=weights_file is not None)
    fill_shared_weights(graph)
    return graph


@dataclass
class QuantGraph:
    """The model, its config and the state of its quantization (see the module doc).

    ``record`` is the record as this session knows it: the weight factors once the weights are
    quantized, and the activation factors once a calibration run in the executor fills it. The
    guide's file flow keeps the record file as the reference instead (``record_in_memory`` False):
    its calibration model may run in another process (real Caffe).
    """

    source: Graph
    config: object
    record_file: str
    model_file: str
    stage: Stage = Stage.INIT
    weights_file: str | None = None
    config_file: str | None = None
    prepared: Prepared | None = None
    weights: QuantizedWeights | None = None
    record: Record = field(default_factory=Record)
    record_in_memory: bool = False

    @classmethod
    def load(cls, config_file, model_file, weights_file, record_file) -> "QuantGraph":
        require(config_file=config_file, model_file=model_file, weights_file=weights_file)
        with reading(config_file=config_file, model_file=model_file, weights_file=weights_file):
            graph = load_float_graph(model_file, weights_file)
            config = load_config(config_file, graph)
        record_file = checked_path(record_file, "scale_offset_record_file")
        return cls(graph, config, os.path.abspath(record_file), str(model_file), weights_file=str(weights_file),
                   config_file=str(config_file))

    def inputs(self, with_record: bool = True) -> dict[str, str]:
        """The files this session read (outputs must not overwrite them), by argument name."""
        files = {"model_file": self.model_file, "weights_file": self.weights_file, "config_file": self.config_file}
        if with_record and not self.record_in_memory:
            files["scale_offset_record_file"] = self.record_file
        return files

    # ------------------------------------------------------------ views
    @property
    def name(self) -> str:
        return self.source.name

    @property
    def original_names(self) -> set[str]:
        return {n.name for n in self.source.nodes}

    @property
    def targets(self) -> list[QuantTarget]:
        return self.prepared.targets if self.prepared is not None else []

    @property
    def bn_kept(self) -> dict[str, list[str]]:
        return self.prepared.bn_kept if self.prepared is not None else {}

    @property
    def graph(self) -> Graph:
        """The working graph: the float model, then (after the weight step) fused with fake-quant weights."""
        return self.weights.graph if self.weights is not None else self.source

    @property
    def float_graph(self) -> Graph | None:
        return self.weights.float_graph if self.weights is not None else None

    def require(self, stage: Stage, step: str, hint: str) -> None:
        if self.stage is not stage:
            raise AmctError(f"{step}: {hint}")

    # ------------------------------------------------------------ steps
    def quantize_weights(self) -> Record:
        """Prepare (fusion, BN acceleration, targets) and quantize the weights; returns the record
        after the weight step (``skip_fusion`` entries and scale_w), also kept as ``record``."""
        self.require(Stage.INIT, "weights_quantize_model", "call it once, right after init()")
        self.prepared = prepare(self.source, self.config)
        self.weights = quantize_weights(self.prepared, self.config)
        self.record = weights_record(self.prepared, self.weights)
        self.stage = Stage.WEIGHTS
        return self.record

    def forget_weights(self) -> None:
        """Back to right after init: the weight step's files could not be written, and the call may be made
        again."""
        self.stage, self.prepared, self.weights, self.record = Stage.INIT, None, None, Record()

    def calibrate_with_float_weights(self) -> None:
        """Make the calibration model run the float weights (each layer's activation factors are then
        those of its float inputs, as if it alone were quantized)."""
        for target in self.targets:
            if target.weighted:
                self.weights.graph.node(target.name).params = list(self.weights.float_graph.node(target.name).params)

    def bn_dump_dir(self) -> str:
        return os.path.abspath(bn_update_settings(self.config).bn_dump_dir)

    def calibration_graph(self) -> Graph:
        """The calibration model: IFMR layers writing ``record_file``, BNUpdate layers for update_bn."""
        if self.stage not in (Stage.WEIGHTS, Stage.ACTIVATIONS):
            raise AmctError("activation_quantize_model: call weights_quantize_model first")
        dump_dir = self.bn_dump_dir()
        if self.bn_kept and os.path.exists(dump_dir) and not os.path.isdir(dump_dir):
            raise AmctError(f"{self.config_file or 'the config'}: bn_update_config.bn_dump_dir {dump_dir} is a file, "
                            "not a directory: give a directory for update_bn's statistics")
        graph = calibration_graph(self.weights.graph, self.prepared, self.config, self.record_file,
                                  bn_update_settings(self.config), self.bn_dump_dir())
        self.stage = Stage.ACTIVATIONS
        return graph

    def stale_bn_dumps(self) -> list:
        """Dump files of the kept BatchNorms left by an earlier run (to delete before calibrating)."""
        return [p for p in (bn_dump_path(self.bn_dump_dir(), chain[0]) for chain in self.bn_kept.values())
                if p.exists()]

    @contextlib.contextmanager
    def bn_dumps_removed_on_failure(self):
        """A block after :meth:`remove_stale_bn_dumps`: if it fails (or is interrupted), the dumps the run wrote
        meanwhile go too, so that a failed run leaves no files behind."""
        try:
            yield
        except BaseException:
            for path in self.stale_bn_dumps():  # (the earlier run's were removed: these are this run's)
                with contextlib.suppress(OSError):
                    path.unlink()
            raise

    def remove_stale_bn_dumps(self) -> None:
        """Delete the dumps of an earlier run (this run's must not be mistaken for them), each checked as the
        output it is first (a file the current call reads, e.g. data in ``bn_dump_dir``, is refused, not lost)."""
        stale = self.stale_bn_dumps()
        for path in stale:
            check_output(path)
        for path in stale:
            path.unlink()

    def calibration_forwards(self) -> int:
        """batch_num, or bn_update_iterations if larger (update_bn with BatchNorm layers to refresh)."""
        n = self.config.batch_num
        if self.bn_kept:
            n = max(n, bn_update_settings(self.config).bn_update_iterations)
        return n

    def final(self, record: Record) -> tuple[Graph, Record]:
        """The float graph to save from and its record, given the calibrated ``record``.

        Without update_bn: the float graph and ``record`` itself. With it: the kept BatchNorms'
        refreshed statistics (read from their dump files) fused into their layers, and a copy of
        ``record`` with those layers' scale_w / offset_w quantized again.
        """
        self.require(Stage.ACTIVATIONS, "save_model",
                     "call activation_quantize_model and run the calibration model first")
        if not self.bn_kept:
            return self.weights.float_graph, record
        settings = bn_update_settings(self.config)
        hint = (f"run the calibration model bn_update_iterations ({settings.bn_update_iterations}) times before "
                "save_model")
        statistics = {}
        for chain in self.bn_kept.values():
            bn = self.weights.float_graph.node(chain[0])
            path = bn_dump_path(self.bn_dump_dir(), bn.name)
            statistics[bn.name] = read_bn_dump(path, bn.name, bn.params[0].size, hint)
            _LOG.info("update_bn: BatchNorm '%s' uses the statistics of %s", bn.name, path)
        graph, factors = refresh_bn_chains(self.prepared, self.weights.float_graph, self.config, statistics)
        record = record.copy()
        record_weight_factors(record, factors)
        return graph, record


def check_session(graph) -> QuantGraph:
    if not isinstance(graph, QuantGraph):
        raise AmctError(f"expected the graph returned by amct_caffe.init(), got {type(graph).__name__}")
    return graph
