"""Accuracy-based fallback: find the layers quantization hurts most and keep them in float.

The guide (量化配置, ``quant_enable``) tells users whose network misses its accuracy to find the
quantization-sensitive layers by comparing the float and quantized outputs layer by layer, and to
switch their quantization off. :func:`calibrate_with_fallback` does that search automatically, in
the manner of TPU-MLIR's ``run_sensitive_layer`` / ``search_qtable``:

1. calibrate every layer the config enables (the guide's flow); if the outputs already reach
   ``target_cosine``, that is the result. Otherwise calibrate again observing the activations of
   the float model: the guide's flow observes them behind the quantized weights, so that one
   broken layer would also spoil the factors of every layer after it, and make them look
   sensitive too;
2. the *sensitivity* of each quantized layer L is ``1 - cos``, where ``cos`` is the mean over the
   evaluation samples of the cosine between the float model's outputs and those of the model in
   which only L is fake-quantized (with the factors of step 1);
3. greedy: layers move to float in decreasing sensitivity until the model with all the other
   layers quantized reaches ``target_cosine`` (or ``max_float_layers`` are float);
4. prune: each float layer, least sensitive first, is quantized again if the target still holds
   without it in float (interactions make some of the greedy choices unnecessary);
5. the model is calibrated again by the guide's flow with ``quant_enable: false`` for the float
   layers. Its factors are observed behind the quantized weights, not on the float model as the
   search's are, so the result can miss a target the search met (a random-weight MobileNet: 0.999516
   with the search's factors, 0.999291 with the guide's): while it does, the next most sensitive
   layer goes float too and the model is calibrated again (within ``max_float_layers``); once the
   target holds, each layer added so, last first, is quantized again if the target holds without it;
   if it never holds, the set of the best output cosine calibrated is kept (all INT8 included). The
   saved models are those of a calibration of the kept set (calibrated again if a later trial ran
   since: with update_bn each calibration rewrites the BatchNorm dumps save_model reads);
6. the config that made the result is written beside the outputs (``<prefix>_fallback_config.json``,
   usable with ``init`` / ``amct-caffe calibrate --config``): the saved models are exactly what
   ``calibrate`` gives with it. Their cosine is measured again and reported.

"Output cosine" is, by default, the smallest over the compared blobs (the network's outputs
unless ``compare_blobs`` names others; a detection list is compared through the blobs it is
computed from, :mod:`amct_caffe.api.compared_outputs`) of the blob's mean per-sample cosine, so
every output has to reach the target; ``metric="all_outputs"`` concatenates the blobs per sample
instead (see :class:`OutputComparator`). Steps 2-4 cost one evaluation pass per
quantized layer plus at most ``2 * max_float_layers``; an evaluation pass runs the fake-quant
model over ``eval_batches`` in the embedded executor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from amct_caffe import log, ops
from amct_caffe.api.calibration import create_quant_config, save_model
from amct_caffe.api.compare import batch_samples, cosine_rows, sample_rows, samples_first
from amct_caffe.api.compared_outputs import net_layers, stand_in_outputs
from amct_caffe.api.outputs import check_saved_outputs
from amct_caffe.api.session import QuantGraph
from amct_caffe.api.workflow import run_calibration
from amct_caffe.config.quant_config import BnUpdateConfig, read_quant_config, write_quant_config
from amct_caffe.data import checked_feeds
from amct_caffe.errors import AmctError
from amct_caffe.io import load_weights
from amct_caffe.io.outputs import StagedOutputs
from amct_caffe.io.paths import reads
from amct_caffe.io.scratch import temporary_directory
from amct_caffe.passes.prepare import prepare
from amct_caffe.passes.quantized_models import FAKE, build_quantized_graph
from amct_caffe.runtime import TEST, Net
from amct_caffe.runtime.memory import few_forwards

_LOG = logging.getLogger(__name__)
Feed = dict[str, np.ndarray]


def _move_into_place(staged: dict[str, str], prefix: str, save_path: str) -> dict[str, str]:
    """The files ``staged`` (named ``prefix``...) written again as ``save_path``..., all or none."""
    outputs, paths = StagedOutputs(), {}
    for kind, path in staged.items():
        paths[kind] = outputs.add_bytes(save_path + path[len(prefix):], Path(path).read_bytes())
    outputs.commit()
    for kind, path in paths.items():
        _LOG.info("fallback: saved %s: %s", kind, path)
    return paths


@dataclass
class FallbackResult:
    """What :func:`calibrate_with_fallback` found and wrote.

    ``sensitivity``: layer -> 1 - cosine with only that layer quantized (step 2; empty when every
    layer quantized already met the target). ``cosine_int8``: all enabled layers quantized;
    ``cosine_final``: the saved fake-quant model (after the second calibration).
    """

    outputs: dict[str, str]
    float_layers: list[str]
    cosine_int8: float
    cosine_final: float
    target_cosine: float
    sensitivity: dict[str, float] = field(default_factory=dict)

    @property
    def target_met(self) -> bool:
        return self.cosine_final >= self.target_cosine


METRICS = ("worst_output", "all_outputs")


class OutputComparator:
    """How close a net's outputs are to a reference net's on fixed batches, as a cosine.

    ``metric``: ``"worst_output"`` -- per compared blob, the mean over samples of the cosine
    between the two nets' values; the smallest of those (every output must reach a target: a
    detector's box regressions count as much as its scores, whatever their magnitudes);
    ``"all_outputs"`` -- the mean over samples of the cosine of all compared blobs concatenated.
    A blob whose first axis is the batch size is split per sample; a batch whose blobs are not all
    split that way counts as one sample.
    """

    def __init__(self, reference_net, batches: Sequence[Feed], compare_blobs: Sequence[str] | None = None,
                 metric: str = "worst_output"):
        if metric not in METRICS:
            raise AmctError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.metric = metric
        self.batches = list(batches)
        if not self.batches:
            raise AmctError("accuracy-based fallback needs at least one evaluation batch")
        if isinstance(compare_blobs, (str, bytes)):  # one name, not its letters
            raise AmctError(f"compare_blobs must be a list of blob names, got the string {compare_blobs!r}: "
                            f"write [{compare_blobs!r}]")
        self.blobs = list(compare_blobs) if compare_blobs else list(reference_net.outputs)
        # a recurrent model's inputs and outputs hold the samples (sequences) on axis 1
        net_param = getattr(reference_net, "net_param", None)  # (a stand-in net of the tests may have none)
        self.time_major = frozenset(ops.time_major_blobs(net_param.layer, downstream=True) if net_param else ())
        missing = [b for b in self.blobs if b not in reference_net.blobs]
        if missing:
            raise AmctError(f"compare_blobs {missing} are not blobs of the float model "
                            f"(its outputs: {list(reference_net.outputs)})")
        self.reference = [self._rows(reference_net, feed) for feed in self.batches]

    def _rows(self, net, feed: Feed) -> list[np.ndarray]:
        """Per compared blob, its values as (samples, D) float64 rows."""
        net.forward(**feed)
        n = batch_samples(feed, self.time_major)  # (an image-info input may hold one row per batch)
        rows = []
        for name in self.blobs:
            if name not in net.blobs:
                raise AmctError(f"blob '{name}' compared for the fallback search is missing from the "
                                "quantized model")
            rows.append(sample_rows(samples_first(net.blobs[name].data, name, self.time_major), n))
        return rows

    def _check(self, ref: list[np.ndarray], out: list[np.ndarray]) -> None:
        for name, r, o in zip(self.blobs, ref, out, strict=True):
            if r.shape != o.shape:
                raise AmctError(f"output '{name}' has {o.size} value(s) in the quantized model and {r.size} in the "
                                "float model (a detection list?): compare fixed-size blobs instead "
                                "(compare_blobs, e.g. the blobs that feed the detection layer)")

    def per_output(self, net) -> dict[str, float]:
        """Per compared blob, the mean over samples of cosine(reference, ``net``)."""
        got = [self._rows(net, feed) for feed in self.batches]
        for ref, out in zip(self.reference, got, strict=True):
            self._check(ref, out)
        return {name: float(np.concatenate([cosine_rows(ref[i], out[i]) for ref, out in
                                            zip(self.reference, got, strict=True)]).mean())
                for i, name in enumerate(self.blobs)}

    def cosine(self, net) -> float:
        """The comparison's cosine under ``metric`` (class doc)."""
        if self.metric == "worst_output":
            return min(self.per_output(net).values())
        values = []
        for ref, feed in zip(self.reference, self.batches, strict=True):
            out = self._rows(net, feed)
            self._check(ref, out)
            if len({r.shape[0] for r in ref}) > 1:  # not every blob has a row per sample: one row per batch
                ref, out = [r.reshape(1, -1) for r in ref], [o.reshape(1, -1) for o in out]
            values.append(cosine_rows(np.concatenate(ref, axis=1), np.concatenate(out, axis=1)))
        return float(np.concatenate(values).mean())


def _materialize(batches, what: str) -> list[Feed]:
    if callable(batches):
        batches = batches()
    out = list(checked_feeds(batches, what))
    if not out:
        raise AmctError(f"{what}: no batch given")
    for i, feed in enumerate(out):  # a NaN makes every cosine NaN, and a NaN never misses the target
        for name, array in feed.items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise AmctError(f"{what}: batch {i}: input '{name}' holds NaN or infinite values; give finite data")
    return out


def _original_weights(session: QuantGraph) -> dict[str, list[np.ndarray]]:
    """Weights of the float model fused as the session's config fuses it, with the BatchNorms' own
    statistics (update_bn off), by layer."""
    graph = prepare(session.source, replace(session.config, update_bn=False)).graph
    return {node.name: list(node.params) for node in graph.nodes if node.params}


def _search_config(config_path: str, tmp: str) -> str:
    """The config for the search's calibration: update_bn dumps go to their own directory, so the
    statistics the guide's flow refreshed (and save_model may still read) stay as they are."""
    config = read_quant_config(config_path)
    if not config.update_bn:
        return config_path
    settings = config.bn_update_config or BnUpdateConfig()
    config.bn_update_config = replace(settings, bn_dump_dir=os.path.join(tmp, "search_bn_dump"))
    path = os.path.join(tmp, "search_config.json")
    write_quant_config(config, path)
    return path


def _by_sensitivity(layers: Sequence[str], sensitivity: dict[str, float]) -> list[str]:
    """``layers``, most sensitive first (model order on a tie)."""
    order = {name: i for i, name in enumerate(layers)}
    return sorted(layers, key=lambda n: (-sensitivity[n], order[n]))


def search_float_layers(score: Callable[[set[str]], float], layers: Sequence[str], target_cosine: float,
                        max_float_layers: int, progress: bool = True) -> tuple[list[str], dict[str, float], float]:
    """Steps 2-4 of the module doc over abstract layers.

    ``score(quantized)`` is the output cosine with exactly the layers of ``quantized`` quantized.
    Returns (float layers in the order they were chosen, sensitivity per layer, cosine of the
    result). Never more than ``max_float_layers`` are float; if the target cannot be met within
    that, the best set found is returned.
    """
    all_layers = list(layers)
    measured: dict[frozenset, float] = {}
    raw_score = score

    def score(quantized: set[str]) -> float:  # noqa: F811  (each set is evaluated once)
        key = frozenset(quantized)
        if key not in measured:
            measured[key] = raw_score(quantized)
        return measured[key]

    sensitivity = {}
    for name in tqdm(all_layers, desc="sensitivity", unit="layer", disable=not progress):
        sensitivity[name] = 1.0 - score({name})
        _LOG.info("fallback search: only '%s' quantized -> output cosine %.10g", name, 1.0 - sensitivity[name])
    ranked = _by_sensitivity(all_layers, sensitivity)
    chosen: list[str] = []
    best = (score(set(all_layers)), [])
    current = best[0]
    for name in ranked[:max_float_layers]:
        if current >= target_cosine:
            break
        chosen.append(name)
        current = score(set(all_layers) - set(chosen))
        _LOG.info("fallback search: %d float layer(s) (+'%s') -> output cosine %.10g", len(chosen), name, current)
        if current > best[0]:
            best = (current, list(chosen))
    if current < target_cosine:  # target out of reach: the best prefix seen
        _LOG.warning("fallback search: %d float layer(s) do not reach output cosine %.10g (best %.10g, with the "
                     "search's factors)", len(chosen), target_cosine, best[0])
        return best[1], sensitivity, best[0]
    for name in reversed(list(chosen)):  # least sensitive first
        trial = [c for c in chosen if c != name]
        value = score(set(all_layers) - set(trial))
        if value >= target_cosine:
            _LOG.info("fallback search: '%s' can stay quantized (output cosine %.10g)", name, value)
            chosen, current = trial, value
    return chosen, sensitivity, current


@reads("model_file", "weights_file", "config_file", "config_defination")
@few_forwards
def calibrate_with_fallback(model_file, weights_file, calibration_batches, save_path, batch_num: int,
                            eval_batches=None, target_cosine: float = 0.9995, max_float_layers: int = 16,
                            config_file=None, config_defination=None, activation_offset: bool = True,
                            compare_blobs: Sequence[str] | None = None, metric: str = "worst_output",
                            progress: bool = True, evaluator: Callable[[Net], float] | None = None,
                            target: float | None = None) -> FallbackResult:
    """Calibrate, then keep the most quantization-sensitive layers in float until the outputs reach
    ``target_cosine`` (see the module doc for the search).

    ``evaluator``: the user's own metric instead of the output cosine (the guide's accuracy-based
    automatic calibration): ``evaluator(net) -> float``, higher is better, e.g. the top-1 accuracy of
    the executor ``net`` (a pycaffe-like Net of the fake-quant model) on the user's labelled data. The
    search then meets ``target`` on that metric (required with it); ``eval_batches``,
    ``compare_blobs`` and ``metric`` do not apply, and the result's ``cosine_*`` fields hold the
    metric's values.

    ``calibration_batches`` / ``eval_batches``: sequences of {input blob: array} (or zero-argument
    callables returning an iterable of them); the calibration data is read twice, and evaluation
    defaults to it. ``config_file`` (an existing JSON config) or ``config_defination`` (.cfg) give
    the starting config, whose disabled layers stay disabled; neither is modified. Writes save_model's
    files for ``save_path`` plus ``<save_path>_fallback_config.json``. ``metric``: see
    :class:`OutputComparator`.
    """
    log.setup()
    if evaluator is not None:
        if not callable(evaluator):
            raise AmctError(f"evaluator must be a function net -> float, got {type(evaluator).__name__}")
        if target is None or isinstance(target, bool) or not isinstance(target, (int, float)) \
                or not np.isfinite(target):
            raise AmctError(f"evaluator needs target, the metric value to reach (a finite number), got {target!r}")
        target_cosine = float(target)
    elif isinstance(target_cosine, bool) or not isinstance(target_cosine, (int, float)) \
            or not 0.0 < target_cosine <= 1.0:
        raise AmctError(f"target_cosine must be a number in (0, 1], got {target_cosine!r}")
    if isinstance(max_float_layers, bool) or not isinstance(max_float_layers, int) or max_float_layers < 0:
        raise AmctError(f"max_float_layers must be an integer >= 0, got {max_float_layers!r}")
    save_path = check_saved_outputs(save_path)  # a file this call reads is refused before the search
    config_out = f"{save_path}_fallback_config.json"  # (written by _move_into_place, from the prefix it saved)
    if config_file is not None and os.path.abspath(config_file) == os.path.abspath(config_out):
        raise AmctError(f"config_file {config_file} is also where the fallback config goes; choose another "
                        "save_path (inputs are never overwritten)")
    calib = _materialize(calibration_batches, "calibration_batches")
    evaluation = _materialize(eval_batches, "eval_batches") if eval_batches is not None else calib
    if evaluator is None:
        load_weights(weights_file)  # NaN / Inf weights: refused as quantization refuses them, before the float net
        reference = Net(str(model_file), str(weights_file), TEST)  # would load them with a warning
        if not compare_blobs:  # the outputs, or what stands for them (a detection list's inputs)
            compare_blobs = stand_in_outputs(net_layers(reference), reference.outputs)[0] or list(reference.outputs)
            if not compare_blobs:
                raise AmctError("the float model has no output blob to compare: name the blobs (compare_blobs)")
        comparator = OutputComparator(reference, evaluation, compare_blobs, metric)
        measure = comparator.cosine
        # the candidate nets need only the compared blobs after a forward: the values before the layers
        # computed in place are written over and those chains fold (Net.from_graph's observed)
        observed = comparator.blobs
    else:
        observed = None  # the user's evaluator may read any blob of the candidate net
        def measure(net) -> float:
            value = evaluator(net)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise AmctError(f"evaluator returned {value!r}, not a number") from None
            if not np.isfinite(value):
                raise AmctError(f"evaluator returned {value}, not a finite number")
            return value
    with temporary_directory("amct_fallback_") as tmp:
        config = os.path.join(tmp, "config.json")
        if config_file is not None:
            if not os.path.isfile(config_file):
                raise AmctError(f"config_file {config_file} does not exist")
            write_quant_config(read_quant_config(config_file), config)
        else:
            create_quant_config(config, model_file, weights_file, batch_num=batch_num,
                                activation_offset=activation_offset, config_defination=config_defination)
        def calibrated(config_path, name, float_weights=False):
            work = os.path.join(tmp, name)
            os.mkdir(work)
            return run_calibration(config_path, model_file, weights_file, calib, work, progress, float_weights)

        def scorer(session: QuantGraph):
            float_graph, record = session.final(session.record)
            targets = {t.name: t for t in session.targets}

            def score(quantized: set[str]) -> float:
                # A layer the search leaves float has its original weights (not SNQ's cluster centres,
                # not BatchNorm statistics refreshed behind quantized weights).
                g = float_graph.copy()
                for name, t in targets.items():
                    if name not in quantized and t.weighted and name in original:
                        g.node(name).params = list(original[name])
                chosen = [t for name, t in targets.items() if name in quantized]
                return measure(Net.from_graph(build_quantized_graph(g, chosen, record, FAKE), TEST,
                                              observed=observed))
            return score, list(targets)

        graph = calibrated(config, "int8")  # the guide's flow with every enabled layer
        original = _original_weights(graph)  # the same config for the search
        score, layers = scorer(graph)
        cosine_int8 = score(set(layers))
        _LOG.info("fallback search: all %d quantized layer(s) -> output cosine %.10g (target %.10g)",
                  len(layers), cosine_int8, target_cosine)
        sensitivity: dict[str, float] = {}
        float_layers: list[str] = []
        final_config = graph.config
        if cosine_int8 < target_cosine and max_float_layers > 0:
            score, layers = scorer(calibrated(_search_config(config, tmp), "search", float_weights=True))
            float_layers, sensitivity, _ = search_float_layers(score, layers, target_cosine, max_float_layers,
                                                               progress)
            ranked = _by_sensitivity(layers, sensitivity)
            measured = {frozenset(): cosine_int8}  # float layers -> the guide's flow's output cosine
            # the last calibration: its session, and its BatchNorm dumps (update_bn) are the ones in bn_dump_dir
            last = {"floats": frozenset(), "session": graph, "rounds": 0}

            def guide_flow(floats, again: bool = False) -> float:
                """The output cosine of the guide's calibration with ``floats`` float (measured once per set,
                unless ``again``)."""
                key = frozenset(floats)
                if key in measured and not again:
                    return measured[key]
                for name in layers:
                    final_config.layers[name].quant_enable = name not in key
                last["rounds"] += 1
                path = os.path.join(tmp, f"final_config_{last['rounds']}.json")
                write_quant_config(final_config, path)
                session = calibrated(path, f"final_{last['rounds']}")
                final_score, quantized = scorer(session)
                measured[key] = final_score(set(quantized))
                last.update(floats=key, session=session)
                return measured[key]

            current, added = guide_flow(float_layers), []
            while current < target_cosine and len(float_layers) < max_float_layers:  # step 5
                extra = next((n for n in ranked if n not in float_layers), None)
                if extra is None:
                    break
                _LOG.info("fallback: with the guide's factors (observed behind the quantized weights) %d float "
                          "layer(s) give output cosine %.10g, below the target; '%s' goes float too",
                          len(float_layers), current, extra)
                float_layers.append(extra)
                added.append(extra)
                current = guide_flow(float_layers)
            if current >= target_cosine:  # the layers step 5 added, last first: those the target does not need
                for name in reversed(added):
                    trial = [n for n in float_layers if n != name]
                    value = guide_flow(trial)
                    if value >= target_cosine:
                        _LOG.info("fallback: '%s' can stay quantized (output cosine %.10g)", name, value)
                        float_layers, current = trial, value
            else:  # out of reach: the best set calibrated (the fewest float layers on a tie)
                best = max(measured, key=lambda k: (measured[k], -len(k)))
                float_layers, current = [n for n in float_layers if n in best], measured[best]
            if last["floats"] != frozenset(float_layers):  # a later trial's session and dumps: calibrate it again
                guide_flow(float_layers, again=True)
            graph = last["session"]
            for name in layers:  # the config of the result
                final_config.layers[name].quant_enable = name not in float_layers
        # the models and the config that made them, measured where they were first saved, then moved into
        # place together: a failure there (the user's evaluator may raise) or an interrupt leaves the
        # previous files as they were
        prefix = os.path.join(tmp, "result", "model")
        staged = save_model(graph, "Both", prefix, {"fallback_config": (f"{prefix}_fallback_config.json",
                                                                         final_config.to_json().encode("utf-8"))})
        cosine_final = measure(Net(staged["fake_quant_model"], staged["fake_quant_weights"], TEST))
        outputs = _move_into_place(staged, prefix, save_path)
    result = FallbackResult(outputs, float_layers, cosine_int8, cosine_final, target_cosine, sensitivity)
    level = logging.INFO if result.target_met else logging.WARNING
    _LOG.log(level, "fallback: %d layer(s) kept in float %s; output cosine %.10g -> %.10g (target %.10g%s)",
             len(float_layers), float_layers, cosine_int8, cosine_final, target_cosine,
             "" if result.target_met else ", NOT met")
    return result
