"""The whole calibration in one call, running the calibration model in the embedded executor."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from amct_caffe.api.calibration import (activation_quantize_model, calibration_forwards, create_quant_config, init,
                                        save_model, weights_quantize_model)
from amct_caffe.errors import AmctError

_LOG = logging.getLogger(__name__)


def calibrate(model_file, weights_file, batches: Iterable[dict[str, np.ndarray]], save_path, batch_num: int,
              config_file=None, config_defination=None, activation_offset: bool = True,
              progress: bool = True) -> dict[str, str]:
    """create_quant_config (unless ``config_file`` exists) -> init -> weights and activation
    quantization -> ``batch_num`` forwards of the calibration model on ``batches`` -> save_model('Both').

    ``batches`` yields {input blob: array}. Intermediate files go to a temporary directory; a
    given ``config_file`` that does not exist yet is written there by create_quant_config.
    Returns the written files by kind.
    """
    with tempfile.TemporaryDirectory(prefix="amct_calib_") as tmp:
        config = config_file or os.path.join(tmp, "config.json")
        if config_file is None or not os.path.exists(config_file):
            create_quant_config(config, model_file, weights_file, batch_num=batch_num,
                                activation_offset=activation_offset, config_defination=config_defination)
        graph = run_calibration(config, model_file, weights_file, batches, tmp, progress)
        return save_model(graph, "Both", save_path)


def run_calibration(config_file, model_file, weights_file, batches: Iterable[dict[str, np.ndarray]], work_dir,
                    progress: bool = True, float_weights: bool = False):
    """init -> weights and activation quantization -> the calibration forwards, in ``work_dir``.

    Returns init's graph, ready for save_model (its record file is ``work_dir``/scale_offset_record.txt).
    ``float_weights``: the calibration model keeps the float weights, so every layer's activation
    factors are those of its float inputs, as if it alone were quantized (the guide's flow, the
    default, observes the activations behind the quantized weights).
    """
    from amct_caffe.runtime import TEST, Net

    graph = init(config_file, model_file, weights_file, os.path.join(work_dir, "scale_offset_record.txt"))
    modified_model = os.path.join(work_dir, "modified_model.prototxt")
    modified_weights = os.path.join(work_dir, "modified_model.caffemodel")
    weights_quantize_model(graph, modified_model, modified_weights)
    if float_weights:
        for target in graph.targets:
            if target.weighted:
                graph.graph.node(target.name).params = list(graph.float_graph.node(target.name).params)
    activation_quantize_model(graph, modified_model, modified_weights)
    needed = calibration_forwards(graph)  # batch_num, or bn_update_iterations if larger
    net = Net(modified_model, modified_weights, TEST)
    done = 0
    for feed in tqdm(batches, total=needed, desc="calibration", unit="batch", disable=not progress):
        net.forward(**feed)
        done += 1
        if done == needed:
            break
    if done < needed:
        raise AmctError(f"calibration needs {needed} batch(es) (batch_num, or bn_update_iterations with "
                        f"update_bn) but the data gave only {done}")
    return graph
