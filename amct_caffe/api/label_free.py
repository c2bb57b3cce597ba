"""Label-free quantization-aware training: the INT8 network learns to reproduce the FP32 network.

Most users quantizing a deployed model have images but no labels. :func:`label_free_retrain`
trains the guide's retrain model (:mod:`amct_caffe.passes.retrain`: a RetrainDataQuant (ULQ,
learned clips) and a RetrainWeightQuant (ARQ of a trained float weight) in front of every
Convolution / Deconvolution / InnerProduct) on the deploy prototxt itself, with the FP32
network's outputs as targets (distillation), and saves it as ``calibrate`` does.

Steps:

0. **Equalize** (``equalize``, default on; :mod:`amct_caffe.api.label_free_equalize`). Where a
   Convolution feeds only a ReLU that feeds only a depthwise Convolution, the ReLU's channels are
   rescaled to about the same range (the first layer's output channel divided by ``s_c``, the
   depthwise channel multiplied by it: the float function is unchanged). The depthwise layer's
   per-tensor INT8 input then serves every channel alike. Both models are calibrated (step 1), and
   the one whose PTQ is closer to FP32 on the data (the distillation loss of step 3) is trained;
   the others are untouched. So the result never loses to the PTQ ``calibrate`` writes.
1. **PTQ start.** The guide's calibration (IFMR on every batch, weights ARQ-quantized) runs in the
   executor; each retrained layer's clip range starts at the factors PTQ found::

       clip_max = scale_d * (2^(b-1) - 1 - offset_d),  clip_min = scale_d * (-2^(b-1) - offset_d)

   so iteration 0 is the PTQ model (up to ULQ's float32 rounding of the same grid). The inputs of
   the data-only layers PTQ quantizes (Pooling, Eltwise, Concat, Softmax...) get a RetrainDataQuant
   fixed at PTQ's factors (:mod:`amct_caffe.api.label_free_save`): training sees, and the saved
   models contain, every quantizer of the PTQ model.
1b. **Learned rounding** (``rounding``, default on; :mod:`amct_caffe.api.label_free_rounding`).
   Layer by layer (one pass over the data per level of the graph, through the layers already
   rounded, beside the float network), every Convolution / InnerProduct takes, per output
   channel, the ARQ codes (floor or ceil of each weight, same scales) that bring its output on
   its quantized input closest to the FP32 network's output of that layer, and the bias takes
   the mean error. Training starts there.
2. **Targets.** The FP32 network runs once over the data; its output blobs are cached per sample
   (an output of data-dependent shape or without a gradient, such as SSD's DetectionOutput, is
   replaced by the blobs it is computed from: :mod:`amct_caffe.api.compared_outputs`).
3. **Training net.** The deploy graph with BatchNorm / Scale folded into the layers before them
   (a deploy model's statistics are kept, not re-estimated on a few images; the saved models
   fold them anyway; :func:`_as_in_test` makes the rest compute the TEST-phase function), the
   retrain layers, an Input ``<o>_fp32`` per target blob ``o`` and an EuclideanLoss per target
   (the layers no loss needs are left out), weighted so every output and every sample counts
   alike::

       loss = sum_o  mean_n ||q_o(x_n) - t_o(x_n)||^2 / ||t_o(x_n)||^2

   For small errors ``1 - cos(q, t) ~ ||q - t||_perp^2 / (2 ||t||^2)``: the loss is about twice the
   sum over outputs of the mean over samples of ``1 - cosine``, the metric users compare. A Scale
   layer multiplies the output by ``a_n = sqrt(mean_m ||t_m||^2 / ||t_n||^2)``, fed as one more
   Input, and the target is fed times ``a_n``; EuclideanLoss computes ``sum ||q - t||^2 / (2 N)``,
   hence ``loss_weight = 2 / mean_n ||t||^2``. With ``per_sample_loss=False`` the samples' errors
   are summed before the division, ``sum_o mean_n ||q - t||^2 / mean_n ||t||^2``: photos of larger
   outputs then count more, and on UltraFace training the clips on that loss fits the bright photos
   and loses on the average one (``benchmarks/label_free_qat.py``).
4. **Solver.** Adam (beta1 0.9, beta2 0.999), ``base_lr`` 1 and a linear ("poly", power 1) decay
   to 0 over ``iterations``; every rate lives in the blobs' ``lr_mult``, scaled so that one Adam
   step (at most about ``lr_mult`` in size) is a fixed fraction of each parameter's own scale:

   * clips: ``clip_lr * max(|clip_max|, |clip_min|)`` (the PTQ range),
   * weights: ``weight_lr * mean_c(max |w_c|) / 127`` (a fraction of the mean INT8 weight step),
   * biases: ``weight_lr * mean_c(max |w_c|) / 127 * clip_max_in`` (that weight step acting on an
     input at the top of its range),
   * every other learned blob (a PReLU slope, a Scale not folded): ``lr_mult`` 0.

   After the learned rounding ``weight_lr`` defaults to 0 (``ROUNDED_WEIGHT_LR``): only the clips
   train and the weights stay on their learned codes; without it, to ``WEIGHT_LR``.

   No weight decay: the goal is the FP32 function, not a regularised one. Batches are drawn
   from the cached samples in a new random order every epoch.
5. **Keep the best.** The distillation loss over all the data is measured for the PTQ model, the
   rounded start and the trained model; the lowest is saved (a tie keeps the earlier), with a
   warning when training did not help. PTQ is saved by ``save_model`` (calibrate's bytes).
6. **Save.** Otherwise the blobs go into the retrain model and
   :func:`~amct_caffe.api.label_free_save.save_trained` writes the fake-quant and deploy models and
   the record for the calibration's layers, the files ``calibrate`` writes.

Models whose Reshape layers fix the batch axis (``dim: 1``) get ``dim: 0`` (copy) in the training
net when training with another batch size; the saved models keep the prototxt as written.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from amct_caffe import log, ops
from amct_caffe.api.calibration import create_quant_config, save_model
from amct_caffe.api.compare import batch_samples
from amct_caffe.api.label_free_data import Feed, fp32_samples
from amct_caffe.api.label_free_equalize import equalize as equalize_ranges
from amct_caffe.api.label_free_rounding import any_batch, round_weights
from amct_caffe.api.label_free_save import save_trained, with_data_only_quant
from amct_caffe.api.outputs import check_save_path, check_saved_outputs, write_graph
from amct_caffe.api.session import load_float_graph
from amct_caffe.api.workflow import run_calibration
from amct_caffe.config import RetrainDataConfig, create_retrain_config
from amct_caffe.config.retrain_config import retrainable_nodes
from amct_caffe.data import given_feeds
from amct_caffe.errors import AmctError
from amct_caffe.io.paths import reading
from amct_caffe.io.schema import caffe_pb
from amct_caffe.io.scratch import temporary_directory
from amct_caffe.ir import Graph, Node
from amct_caffe.passes.fusion import fuse_bn_scale
from amct_caffe.passes.retrain import DATA_QUANT, WEIGHT_QUANT, RetrainSpec, insert_retrain_layers, retrain_specs
from amct_caffe.runtime import TRAIN, AdamSolver, Net
from amct_caffe.runtime.layers.activation import dropout_scale

_LOG = logging.getLogger(__name__)

DEFAULT_EPOCHS = 3         # passes over the data when ``iterations`` is not given ...
MIN_ITERATIONS = 200       # ... but at least this many updates
CLIP_LR, WEIGHT_LR = 5e-3, 5e-2
# After the learned rounding the weights and biases stay where it put them (only the clips train):
# Adam moves every weight about ``weight_lr`` steps per iteration whatever its gradient, which undoes
# the rounding (UltraFace, 20 unseen photos: boxes cosine 0.99862 rounded, 0.99870 with the clips
# trained, 0.99862 with the weights too, batches of 8 at weight_lr 0.01).
ROUNDED_WEIGHT_LR = 0.0
# The per-sample loss divides by each sample's target energy, at least this fraction of the mean: a
# sample whose target is (almost) zero, a blank image's heat map, would otherwise weigh without bound
# (its cosine is undefined), and one quantized value a little off zero would swamp the loss.
SAMPLE_ENERGY_FLOOR = 1e-2


@dataclass
class LabelFreeResult:
    """What :func:`label_free_retrain` wrote and how training went.

    ``losses``: the training loss of every iteration (module doc, step 3); ``loss_start`` /
    ``loss_end``: their mean over the first / last tenth of the iterations (at least one).
    """

    outputs: dict[str, str]
    iterations: int
    batch_size: int
    samples: int
    losses: list[float] = field(default_factory=list)
    # the distillation loss over all the data before and after training, and whether the trained
    # model was kept (False: training did not lower it, so the calibrated start was saved)
    data_loss_before: float = float("nan")
    data_loss_after: float = float("nan")
    kept_trained: bool = True
    # which model was saved: "trained", "rounded" (step 1b's start) or "ptq"; and the PTQ model's
    # data loss (measured when step 1b runs)
    kept: str = "trained"
    data_loss_ptq: float = float("nan")
    # the blobs distilled: the float model's outputs, or what stands for them (a detection list's inputs)
    targets: list[str] = field(default_factory=list)

    @property
    def loss_start(self) -> float:
        return float(np.mean(self.losses[:max(1, len(self.losses) // 10)]))

    @property
    def loss_end(self) -> float:
        return float(np.mean(self.losses[-max(1, len(self.losses) // 10):]))


# ------------------------------------------------------------------------------------ the graph
def _needed_only(graph: Graph) -> None:
    """Removes the layers no loss reads from, directly or not (a detection layer after the targets);
    Input layers stay, as they are fed."""
    needed: set[str] = set()
    dropped = 0
    for node in reversed(list(graph.nodes)):
        if node.type == "Input" or node.type == "EuclideanLoss" or needed.intersection(node.tops):
            needed.update(node.bottoms)
        else:
            graph.remove(node)
            dropped += 1
    if dropped:
        graph.prune_blobs()


def _as_in_test(graph: Graph) -> None:
    """Makes the training net compute the deploy (TEST) function the targets come from: BatchNorm
    with its stored statistics (``use_global_stats``, which also stops the moving averages that
    would change the saved blobs), Dropout as its TEST-phase scaling (a Power layer), no phase rules."""
    for node in graph.nodes:
        lp = node.layer_param
        del lp.include[:]
        del lp.exclude[:]
        if node.type == "BatchNorm":
            lp.batch_norm_param.use_global_stats = True
        elif node.type == "Dropout":
            dp = lp.dropout_param
            scaled = "scale_train" not in dp.DESCRIPTOR.fields_by_name or dp.scale_train
            factor = 1.0 if scaled else float(np.float32(1.0 / float(dropout_scale(dp.dropout_ratio))))
            lp.ClearField("dropout_param")
            node.type = lp.type = "Power"
            lp.power_param.scale = factor


def _clip_start(record, spec: RetrainSpec) -> tuple[float, float]:
    """PTQ's grid as a clip range (module doc, step 1); clip_min 0 with fixed_min."""
    entry = record.layer(spec.layer)
    act = entry.activation(0) if entry is not None else None
    if act is None or act.scale_d is None:
        raise AmctError(f"layer '{spec.layer}': the calibration gave no scale_d / offset_d to start retraining from")
    b = spec.data.num_bits
    scale, offset = float(act.scale_d), int(act.offset_d or 0)
    cmax = scale * ((1 << (b - 1)) - 1 - offset)
    cmin = 0.0 if spec.data.fixed_min else min(0.0, scale * (-(1 << (b - 1)) - offset))
    return float(np.float32(cmax)), float(np.float32(cmin))


def _retrain_graph(graph: Graph, record, record_file: str) -> tuple[Graph, list[RetrainSpec]]:
    """The BN-folded float graph with the retrain layers of every retrainable layer, clips at PTQ's."""
    config = create_retrain_config(graph)
    specs = []
    for spec in retrain_specs(graph, config):
        cmax, cmin = _clip_start(record, spec)
        data = RetrainDataConfig(spec.data.algo, cmax, None if spec.data.fixed_min else cmin, spec.data.fixed_min,
                                 spec.data.num_bits)
        specs.append(RetrainSpec(spec.layer, spec.layer_type, spec.weight_shape, data, spec.weight))
    if not specs:
        raise AmctError(f"model '{graph.name}' has no layer to retrain (Convolution, Deconvolution, InnerProduct "
                        "with weights)")
    retrain = insert_retrain_layers(graph, specs, record_file)
    for node in retrain.nodes:  # start at the clips, not at IFMR of the first batch
        if node.type == DATA_QUANT:
            p = node.layer_param.retrain_data_quant_param
            p.ifmr_init = False
            spec = next(s for s in specs if s.layer == p.object_layer)
            p.clip_max = spec.data.clip_max
            p.clip_min = spec.data.clip_min or 0.0
            node.params = [np.array([p.clip_max], np.float32), np.array([p.clip_min], np.float32)]
    return retrain, specs


def _with_params(graph: Graph, params: dict[str, list[np.ndarray]]) -> Graph:
    """A copy of ``graph`` whose layers named in ``params`` hold those blobs."""
    out = graph.copy()
    for node in out.nodes:
        if node.name in params:
            node.params = list(params[node.name])
    return out


def _set_rates(graph: Graph, clip_lr: float, weight_lr: float, fixed: set[str]) -> None:
    """Every learned blob's lr_mult (module doc, step 4), decay_mult 0; the ``fixed`` layers keep
    theirs (0: the data-only layers' quantizers stay at PTQ's factors)."""
    clip_of = {}
    for node in graph.nodes:
        if node.type == DATA_QUANT and node.name not in fixed:
            p = node.layer_param.retrain_data_quant_param
            clip_of[p.object_layer] = max(abs(p.clip_max), abs(p.clip_min))
    weight_owner = {}
    for node in graph.nodes:
        if node.type == WEIGHT_QUANT:
            weight_owner[graph.consumers(node.tops[0])[0].name] = node
    for node in graph.nodes:
        lp = node.layer_param
        if node.name in fixed:
            continue
        if node.type == DATA_QUANT:
            rate = clip_lr * clip_of[lp.retrain_data_quant_param.object_layer]
            for spec in lp.param:
                spec.lr_mult, spec.decay_mult = rate, 0.0
        elif node.type == WEIGHT_QUANT:
            continue  # blob 0: lr_mult 0 already; blob 1 below, with its object layer
        elif node.name in weight_owner:
            owner = weight_owner[node.name]
            w = np.abs(np.asarray(owner.params[1], np.float32))
            step = float(np.mean(w.reshape(w.shape[0], -1).max(axis=1))) / 127.0
            owner.layer_param.param[1].lr_mult, owner.layer_param.param[1].decay_mult = weight_lr * step, 0.0
            while len(lp.param) < len(node.params):
                lp.param.add()
            for spec in lp.param[1:]:  # the bias
                spec.lr_mult, spec.decay_mult = weight_lr * step * clip_of[node.name], 0.0
        elif node.params:
            del lp.param[:]
            for _ in node.params:
                lp.param.add(lr_mult=0.0, decay_mult=0.0)


def _training_graph(retrain: Graph, inputs: dict, targets: dict, batch: int, model_batch: int,
                    per_sample: bool = False) -> tuple[Graph, dict[str, np.ndarray]]:
    """The retrain graph at ``batch`` with the FP32 targets as inputs and one loss per output;
    also what to feed it per sample, {blob: (samples, ...) array}: the inputs and the targets.

    ``per_sample``: each sample's error counts relative to its own target's energy (module doc,
    step 3): the output and its target are both scaled by ``a_n = sqrt(mean_m ||t_m||^2 /
    ||t_n||^2)`` (a Scale layer on the output, the target fed scaled, the factors fed as one
    more Input), so ``loss = sum_o mean_n ||q - t||^2 / ||t_n||^2`` (``||t_n||^2`` at least
    ``SAMPLE_ENERGY_FLOOR`` of its mean).
    """
    out = any_batch(retrain, model_batch) if batch != model_batch else retrain.copy()
    _as_in_test(out)
    feeds = dict(inputs)
    missing = sorted(set(targets) - {t for node in out.nodes for t in node.tops})
    if missing:
        raise AmctError(f"blob(s) {missing} of the float model are missing from the retrain model")
    for node in out.nodes:
        lp = node.layer_param
        if node.type == "Input":
            for top, shape in zip(node.tops, lp.input_param.shape, strict=False):
                shape.dim[:] = [batch, *inputs[top].shape[1:]] if top in inputs else shape.dim
    for name, t in targets.items():
        top = out.unique_blob_name(f"{name}_fp32")
        lp = caffe_pb().LayerParameter(name=out.unique_node_name(top), type="Input", top=[top])
        lp.input_param.shape.add().dim.extend([batch, *t.shape[1:]])
        out.insert(0, Node(lp.name, "Input", [], [top], [], lp, origin=[]))
        energies = np.sum(np.square(t.reshape(len(t), -1).astype(np.float64)), axis=1)
        energy = float(np.mean(energies))
        compared = name
        feeds[top] = t
        if per_sample:
            factor = out.unique_blob_name(f"{name}_fp32_factor")
            lp = caffe_pb().LayerParameter(name=out.unique_node_name(factor), type="Input", top=[factor])
            lp.input_param.shape.add().dim.extend([batch])
            out.insert(0, Node(lp.name, "Input", [], [factor], [], lp, origin=[]))
            a = np.sqrt(energy / np.maximum(energies, SAMPLE_ENERGY_FLOOR * energy + 1e-30)).astype(np.float32)
            feeds[factor] = a
            feeds[top] = (t * a.reshape(-1, *([1] * (t.ndim - 1)))).astype(np.float32)
            compared = out.unique_blob_name(f"{name}_per_sample")
            lp = caffe_pb().LayerParameter(name=out.unique_node_name(compared), type="Scale", bottom=[name, factor],
                                           top=[compared])
            lp.scale_param.axis = 0
            out.insert(len(out.nodes), Node(lp.name, "Scale", [name, factor], [compared], [], lp, origin=[]))
        loss = out.unique_node_name(f"{name}_distill_loss")
        lp = caffe_pb().LayerParameter(name=loss, type="EuclideanLoss", bottom=[compared, top], top=[loss])
        lp.loss_weight.append(2.0 / max(energy, 1e-30))
        out.insert(len(out.nodes), Node(loss, "EuclideanLoss", [compared, top], [loss], [], lp, origin=[]))
    _needed_only(out)
    return out, feeds


# ---------------------------------------------------------------------------------------- train
def _feed(net, feeds: dict, idx) -> None:
    """Samples ``idx`` of the cached inputs and FP32 targets into the training net's Input blobs."""
    for name, value in feeds.items():
        part, blob = value[idx], net.blobs[name]
        if blob.data.shape != part.shape:  # a last smaller batch, or the whole batches again after it
            blob.reshape(*part.shape)
        blob.data[...] = part


def _graph_loss(train: tuple[Graph, dict[str, np.ndarray]], batch: int) -> float:
    """:func:`_data_loss` of a training graph (and its feeds) run in memory."""
    graph, feeds = train
    return _data_loss(Net.from_graph(graph, TRAIN), feeds, batch)


def _data_loss(net, feeds: dict, batch: int) -> float:
    """Mean distillation loss of ``net`` per sample over all the data, in batches of ``batch`` in order, the last
    one smaller if need be (forward only): each batch's loss, a mean over its samples, weighs by their count."""
    n = len(next(iter(feeds.values())))
    total = 0.0
    for start in range(0, n, batch):
        idx = np.arange(start, min(start + batch, n))
        _feed(net, feeds, idx)
        net.forward()
        total += float(net.loss) * len(idx)
    return total / n


def _train(graph: Graph, work: str, feeds: dict, batch: int, iterations: int, bar,
           seed: int) -> tuple[list[float], dict[str, list[np.ndarray]] | None, float, float]:
    """Adam on the training graph; returns the per-iteration losses, the trained blobs by layer
    (None when training did not lower the distillation loss over all the data: the caller then
    saves the start, so that label-free QAT never ends worse than where training began) and that
    loss before and after.
    """
    model, weights = os.path.join(work, "train.prototxt"), os.path.join(work, "train.caffemodel")
    write_graph(graph, model, weights)
    solver_file = os.path.join(work, "solver.prototxt")
    with open(solver_file, "w", encoding="utf-8") as f:
        f.write(f'train_net: "{model}"\ntype: "Adam"\nbase_lr: 1\nlr_policy: "poly"\npower: 1\n'
                f"max_iter: {iterations}\nmomentum: 0.9\nmomentum2: 0.999\ndelta: 1e-8\nweight_decay: 0\n"
                "display: 0\nsnapshot: 0\nsnapshot_after_train: false\nsolver_mode: CPU\n")
    solver = AdamSolver(solver_file, progress=False)
    solver.net.copy_from(weights)
    before = _data_loss(solver.net, feeds, batch)
    n = len(next(iter(feeds.values())))
    rng = np.random.default_rng(seed)
    losses = []
    order = np.empty(0, np.int64)  # the samples still to draw: a new permutation each epoch, made as needed
    for it in range(iterations):
        while len(order) < batch:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch], order[batch:]
        _feed(solver.net, feeds, idx)
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # a diverging step is reported below, once
                solver.step(1)
        except AmctError as e:  # e.g. a clip range gone non-finite: the retrain layers refuse it
            _LOG.warning("label-free QAT diverged at iteration %d (%s): the trained model is not kept; try "
                         "smaller --clip-lr / --weight-lr", it + 1, e)
            bar.update(iterations - it)  # the steps left are not taken: the bar still ends at 100 %
            return losses, None, before, math.nan
        losses.append(float(solver.net.loss))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3e}")
        bar.update(1)
    after = _data_loss(solver.net, feeds, batch)
    if not after < before:
        if before == 0:
            _LOG.info("label-free QAT: the model training started from already gives the FP32 outputs on the data "
                      "(distillation loss 0); the trained model is not kept")
        else:
            _LOG.warning("label-free QAT did not lower the distillation loss over the data (%.4g before, %.4g "
                         "after): the trained model is not kept; try fewer iterations or smaller "
                         "--clip-lr / --weight-lr", before, after)
        return losses, None, before, after
    trained = {name: [np.array(b.data, np.float32) for b in blobs] for name, blobs in solver.net.params.items()}
    return losses, trained, before, after


MAX_ITERATIONS = 2**31 - 1  # Caffe's max_iter is an int32


def label_free_retrain(model_file, weights_file, data, save_path, *, iterations: int | None = None,
                       batch_size: int = 0, preprocess=None, clip_lr: float = CLIP_LR, weight_lr: float | None = None,
                       seed: int = 0, equalize: bool = True, rounding: bool = True,
                       per_sample_loss: bool = True,
                       progress: bool = True) -> LabelFreeResult:
    """Quantization-aware training without labels: distil the FP32 model into its INT8 model.

    ``model_file`` / ``weights_file``: the float deploy model (Input layers). ``data``: what
    ``amct-caffe calibrate --data`` takes (a path, read in batches of the model's batch size with
    ``preprocess``, a :class:`~amct_caffe.data.Preprocess` or its fields) or a sequence of
    {input blob: array} batches (one mapping is one batch). ``iterations``: Adam updates (default:
    ``DEFAULT_EPOCHS`` passes over the data, at least ``MIN_ITERATIONS``), each on ``batch_size``
    samples (0: the first batch's size). ``clip_lr`` / ``weight_lr``: the relative step sizes (module doc, step 4;
    ``weight_lr`` None: ``ROUNDED_WEIGHT_LR`` (0, the weights and biases stay on their learned
    codes) after the learned rounding, else ``WEIGHT_LR``).
    ``equalize``: equalize the channel ranges before depthwise convolutions first (module doc, step 0).
    ``rounding``: start training from the learned rounding of the weights (module doc, step 1b).
    ``per_sample_loss``: each sample's error relative to its own target's energy in the distillation
    loss (module doc, step 3), in training and in the keep-the-best check; False: relative to the
    mean energy over the data.

    Writes the files ``calibrate`` writes (``{save_path}_fake_quant_model.prototxt``,
    ``_fake_quant_weights.caffemodel``, ``_deploy_model.prototxt``, ``_deploy_weights.caffemodel``,
    ``_quant.json``, ``_quant_param_record.txt`` / ``.bin``), all or nothing, never over an input.
    The math is in the module doc.
    """
    log.setup()
    for name, value, least in (("iterations", iterations, 1), ("batch_size", batch_size, 0), ("seed", seed, 0)):
        if value is None and name == "iterations":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise AmctError(f"{name} must be an integer >= {least}, got {value!r}")
    if iterations is not None and iterations > MAX_ITERATIONS:
        raise AmctError(f"iterations must be at most {MAX_ITERATIONS} (a solver's max_iter), got {iterations}")
    if weight_lr is None:
        weight_lr = ROUNDED_WEIGHT_LR if rounding else WEIGHT_LR
    for name, value in (("clip_lr", clip_lr), ("weight_lr", weight_lr)):
        numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if not numeric or not (math.isfinite(value) and value >= 0):
            raise AmctError(f"{name} must be a finite number >= 0, got {value!r}")
    save_path = check_save_path(save_path)
    with reading(model_file=model_file, weights_file=weights_file):
        check_saved_outputs(save_path)  # refused before any work; the save checks again, knowing only its inputs
        feeds = given_feeds(data, model_file, "label_free_retrain", preprocess=preprocess)
        model_batch = batch_samples(feeds[0])
        batch = batch_size or model_batch
        samples = sum(batch_samples(f) for f in feeds)
        if batch > samples:
            raise AmctError(f"batch size {batch} is larger than the {samples} sample(s) of the data")
        iterations = iterations or max(MIN_ITERATIONS, math.ceil(DEFAULT_EPOCHS * samples / batch))
        with temporary_directory("amct_lfqat_") as work, \
                tqdm(total=2 * len(feeds) + iterations, desc="label-free QAT", unit="step",
                     disable=not progress) as bar:
            graph = load_float_graph(model_file, weights_file)
            _refuse_untrainable(graph, model_file)
            bar.set_description("FP32 targets")
            inputs, targets = fp32_samples(graph, feeds, bar)
            fuse_bn_scale(graph)

            def ptq_start(graph, model, weights, name):  # step 1 on ``graph``: its PTQ session, retrain graph, loss
                config = os.path.join(work, f"{name}_config.json")
                create_quant_config(config, model, weights, batch_num=len(feeds))
                bar.set_description("calibration")
                session = run_calibration(config, model, weights, _counted(feeds, bar), os.path.join(work, name),
                                          progress=False)
                retrain, _ = _retrain_graph(graph, session.record, os.path.join(work, f"{name}_record.txt"))
                retrain, fixed = with_data_only_quant(retrain, session.targets, session.record)
                train = _training_graph(retrain, inputs, targets, batch, model_batch, per_sample_loss)
                return session, retrain, fixed, _graph_loss(train, batch)

            plain = graph.copy()
            session, retrain, fixed, ptq_loss = ptq_start(graph, model_file, weights_file, "model")
            if equalize and equalize_ranges(graph, feeds):  # step 0: kept where its PTQ is closer to FP32
                bar.total += len(feeds)
                equalized = os.path.join(work, "equalized.prototxt"), os.path.join(work, "equalized.caffemodel")
                write_graph(graph, *equalized)
                start = ptq_start(graph, *equalized, "equalized")
                if start[3] < ptq_loss:
                    session, retrain, fixed, ptq_loss = start
                else:
                    _LOG.info("label-free QAT: range equalization does not lower PTQ's loss (%.4g, against %.4g "
                              "without): the model's own PTQ is the start", start[3], ptq_loss)
                    graph = plain
            rounded = False
            if rounding:
                bar.set_description("rounding")
                rounded = bool(round_weights(retrain, inputs, model_batch, graph))
            rated = retrain.copy()  # the training's rates; the models saved keep the user's ParamSpecs
            _set_rates(rated, clip_lr, weight_lr, set(fixed))
            train_graph, train_feeds = _training_graph(rated, inputs, targets, batch, model_batch, per_sample_loss)
            bar.set_description("retrain")
            losses, trained, before, after = _train(train_graph, work, train_feeds, batch, iterations, bar, seed)
            # the lowest loss over the data of the three; a NaN (not measured) loses every comparison
            better_than_ptq = {"trained": not after >= ptq_loss, "rounded": rounded and before < ptq_loss}
            kept = "trained" if trained is not None and better_than_ptq["trained"] else \
                "rounded" if better_than_ptq["rounded"] else "ptq"
            if kept == "ptq":  # exactly what calibrate writes
                outputs = save_model(session, "Both", save_path)
            else:
                outputs = save_trained(_with_params(retrain, trained or {}), fixed, session, save_path)
    result = LabelFreeResult(outputs, iterations, batch, samples, losses, before, after, kept == "trained", kept,
                             ptq_loss, list(targets))
    _LOG.info("label-free QAT: %d iteration(s) of %d sample(s); loss %.4g -> %.4g", iterations, batch,
              result.loss_start, result.loss_end)
    return result


def _refuse_untrainable(graph: Graph, model_file) -> None:
    """Refused before any work: a model with no layer to retrain, and a recurrent one (the retrain model
    trains the layers before and after an LSTM / RNN / GRU through its float form, so its losses would
    leave out the recurrent layer's own quantization, its hidden state)."""
    found = [node.name for node in graph.nodes if ops.layer_type(node.type).recurrent]
    if found:
        raise AmctError(f"{model_file}: layer '{found[0]}' ({graph.node(found[0]).type}) is recurrent: label-free "
                        "QAT cannot train through a quantized LSTM / RNN / GRU yet; quantize this model with "
                        "calibrate (post-training quantization)")
    if not retrainable_nodes(graph, log_skipped=False):
        raise AmctError(f"{model_file}: no layer to retrain (Convolution, Deconvolution, InnerProduct with "
                        "weights); quantize this model with calibrate (post-training quantization)")


def _counted(feeds: list[Feed], bar):
    """``feeds``, each counted on the bar as it is handed out (the calibration may not ask past its last batch,
    so a count after the hand-out would be lost and the bar would end short of 100 %)."""
    for feed in feeds:
        bar.update(1)
        yield feed

