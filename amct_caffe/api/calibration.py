"""Post-training quantization, the guide's 训练后量化 interfaces.

create_quant_config -> init -> weights_quantize_model -> activation_quantize_model -> (run the
calibration model batch_num times) -> save_model.

Each function loads what it needs, runs the pipeline through the session (:mod:`.session`) and
writes the files the guide names. The record file is the reference between the steps: the
calibration model may run in real Caffe, whose IFMR layers write the activation factors there.
"""

from __future__ import annotations

import logging

from amct_caffe import log
from amct_caffe.api.outputs import save_quantized, stage_graph, write_graph
from amct_caffe.api.session import QuantGraph, check_session, load_float_graph
from amct_caffe.config import create_default_config, write_quant_config
from amct_caffe.io.outputs import StagedOutputs
from amct_caffe.io.paths import check_output, reading, require
from amct_caffe.io.record import Record, RecordError, read_record, record_file, remember_written, write_record
from amct_caffe.passes.prepare import Stage

_LOG = logging.getLogger(__name__)

__all__ = ["QuantGraph", "activation_quantize_model", "calibration_forwards", "create_quant_config", "init",
           "save_model", "weights_quantize_model"]


def create_quant_config(config_file, model_file, weights_file, batch_num=1, activation_offset=True,
                        config_defination=None) -> None:
    """Write the full quantization config (JSON) of every quantizable layer of the model."""
    log.setup()
    require(model_file=model_file, weights_file=weights_file)
    with reading(model_file=model_file, weights_file=weights_file, config_defination=config_defination):
        graph = load_float_graph(model_file, weights_file)
        config = create_default_config(graph, batch_num, activation_offset, config_defination)
        write_quant_config(config, config_file)
    _LOG.info("quantization config of %d layer(s) written to %s", len(config.quantized_layers()), config_file)


def init(config_file, model_file, weights_file, scale_offset_record_file) -> QuantGraph:
    """Parse the model and config, and create (or empty) the record file."""
    log.setup()
    session = QuantGraph.load(config_file, model_file, weights_file, scale_offset_record_file)
    with reading(**session.inputs(with_record=False)):
        write_record(Record(), scale_offset_record_file)
    _LOG.info("init: model %s, %d layer(s) to quantize, record %s", model_file,
              len(session.config.quantized_layers()), scale_offset_record_file)
    return session


def weights_quantize_model(graph, modified_model_file, modified_weights_file) -> None:
    """Fuse BN/Scale/Bias, quantize the weights of the enabled layers (ARQ or SNQ), record scale_w."""
    session = check_session(graph)
    log.setup()
    record = session.quantize_weights()
    try:
        with reading(**session.inputs()):  # the model files are no input, the record file included
            check_output(modified_model_file)
            check_output(modified_weights_file)
        # the model and the record (which this call writes, and the later steps read) in one all-or-nothing step;
        # the record's text is printed while the model is written
        with reading(**session.inputs(with_record=False)), StagedOutputs(ahead=True) as outputs:
            stage_graph(outputs, session.graph, modified_model_file, modified_weights_file, in_place=True)
            printed = record_file(record)
            outputs.add_text(session.record_file, printed[0])
            outputs.commit()
        remember_written(session.record_file, printed)
    except BaseException:
        session.forget_weights()  # nothing was written: the call may be made again
        raise
    _LOG.info("weights of %d layer(s) quantized; model written to %s",
              sum(t.weighted for t in session.targets), modified_model_file)


def activation_quantize_model(graph, modified_model_file, modified_weights_file) -> None:
    """Write the calibration model: IFMR layers observing every quantized input (and BNUpdate layers
    refreshing the kept BatchNorms, with update_bn)."""
    session = check_session(graph)
    log.setup()
    calibration = session.calibration_graph()
    with reading(**session.inputs()):
        session.remove_stale_bn_dumps()  # a dump of an earlier run must not be taken for this one's
        write_graph(calibration, modified_model_file, modified_weights_file, in_place=True)
    _LOG.info("calibration model written to %s: run it %d time(s), then call save_model", modified_model_file,
              session.calibration_forwards())


def calibration_forwards(graph) -> int:
    """How many times the calibration model must run: batch_num, or bn_update_iterations if larger
    (update_bn with BatchNorm layers to refresh)."""
    return check_session(graph).calibration_forwards()


def save_model(graph, save_type, save_path, extra_files: dict[str, tuple[str, bytes]] | None = None) -> dict[str, str]:
    """Save the fake-quant model (runs in Caffe) and/or the deploy model (for the SoC compiler).

    ``extra_files`` (ours): {kind: (path, bytes)} written in the same all-or-nothing step.
    """
    session = check_session(graph)
    log.setup()
    session.require(Stage.ACTIVATIONS, "save_model",
                    "call activation_quantize_model and run the calibration model first")
    calibrated = session.record if session.record_in_memory else read_record(session.record_file)
    float_graph, record = session.final(calibrated)
    with reading(**session.inputs()):
        try:
            paths = save_quantized(float_graph, session.targets, record, save_type, save_path,
                                   session.original_names, extra_files)
        except RecordError as e:  # a factor missing or out of range: name the record it comes from
            if session.record_in_memory or str(e).startswith(str(session.record_file)):
                raise
            raise RecordError(f"{session.record_file}: {e}") from None
    if session.bn_kept and not session.record_in_memory:
        # update_bn re-quantized the kept layers' weights: the record file gets their new scale_w.
        with reading(**session.inputs(with_record=False)):
            write_record(record, session.record_file)
    return paths
