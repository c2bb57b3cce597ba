"""The whole calibration in one call, the calibration graph running in the embedded executor.

Nothing goes through files between the steps: the session (:mod:`.session`) prepares and
quantizes the weights in memory, the calibration graph runs in a Net built from it, and its IFMR
layers fill the session's record in memory. The saved models are byte for byte those of the
guide's file flow with the same inputs (tests/api/test_embedded_flow.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from amct_caffe import log
from amct_caffe.api.calibration import create_quant_config, save_model
from amct_caffe.api.outputs import check_save_path, check_saved_outputs
from amct_caffe.api.session import QuantGraph
from amct_caffe.data import checked_feeds
from amct_caffe.errors import AmctError
from amct_caffe.io.paths import reading
from amct_caffe.io.scratch import temporary_directory
from amct_caffe.runtime import TEST, Net

_LOG = logging.getLogger(__name__)


def calibrate(model_file, weights_file, batches: Iterable[dict[str, np.ndarray]], save_path, batch_num: int,
              config_file=None, config_defination=None, activation_offset: bool = True,
              progress: bool = True) -> dict[str, str]:
    """create_quant_config (unless ``config_file`` exists) -> weights and activation quantization ->
    ``batch_num`` forwards of the calibration model on ``batches`` -> save_model('Both').

    ``batches`` yields {input blob: array} (one such mapping is one batch; each is checked as it is
    drawn). A given ``config_file`` that does not exist yet is written by create_quant_config;
    without one the config lives in a temporary directory.
    Returns the written files by kind.
    """
    check_save_path(save_path)
    given_config = config_file if config_file is not None and os.path.exists(config_file) else None
    with reading(model_file=model_file, weights_file=weights_file, config_file=given_config,
                 config_defination=config_defination), temporary_directory("amct_calib_") as tmp:
        check_saved_outputs(save_path)  # a file this call reads is refused before the work, not after it
        config = config_file or os.path.join(tmp, "config.json")
        if given_config is None:
            create_quant_config(config, model_file, weights_file, batch_num=batch_num,
                                activation_offset=activation_offset, config_defination=config_defination)
        graph = run_calibration(config, model_file, weights_file, batches, tmp, progress)
        with graph.bn_dumps_removed_on_failure():
            return save_model(graph, "Both", save_path)


def run_calibration(config_file, model_file, weights_file, batches: Iterable[dict[str, np.ndarray]], work_dir,
                    progress: bool = True, float_weights: bool = False) -> QuantGraph:
    """Weights and activation quantization, then the calibration forwards, all in memory.

    Returns the session, ready for save_model (its record, filled in memory, is never written to
    ``work_dir``/scale_offset_record.txt, which only names it). ``float_weights``: the calibration
    model keeps the float weights, so every layer's activation factors are those of its float
    inputs, as if it alone were quantized (the guide's flow, the default, observes the activations
    behind the quantized weights).
    """
    log.setup()
    session = QuantGraph.load(config_file, model_file, weights_file, os.path.join(work_dir, "scale_offset_record.txt"))
    session.record_in_memory = True
    session.quantize_weights()
    if float_weights:
        session.calibrate_with_float_weights()
    calibration = session.calibration_graph()
    session.remove_stale_bn_dumps()  # a dump of an earlier run must not be taken for this one's
    needed = session.calibration_forwards()  # batch_num, or bn_update_iterations if larger
    # Only the calibration layers read the values (each is a reader of its own, so nothing they read is
    # written over): the float model's in-place layers run in place again and their chains fold, with the
    # kernels of the guide's calibration model run by Net (runtime/fold.py, CALIBRATION), for the same record.
    net = Net.from_graph(calibration, TEST, records={session.record_file: session.record},
                         observed=calibration.outputs, fold="auto")
    done = 0
    with session.bn_dumps_removed_on_failure(), \
            tqdm(total=needed, desc="calibration", unit="batch", disable=not progress) as bar:
        for feed in checked_feeds(batches, "calibration data", net.inputs):
            net.forward(**feed)
            done += 1
            bar.update(1)  # counted after the forward, so the bar ends at 100% with the last batch
            if done == needed:
                break
        if done < needed:
            raise AmctError(f"calibration needs {needed} batch(es) (batch_num, or bn_update_iterations with "
                            f"update_bn) but the data gave only {done}")
    return session
