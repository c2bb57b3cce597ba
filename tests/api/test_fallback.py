"""Accuracy-based fallback (amct_caffe.api.fallback): the search, and the whole flow on a model with one
layer that INT8 weights cannot represent."""

import json
import types
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import AmctError
from amct_caffe.api.fallback import calibrate_with_fallback, cosine_rows, search_float_layers
from amct_caffe.api.workflow import calibrate
from amct_caffe.runtime import TEST, Net

SHAPE = (4, 3, 8, 8)
MODEL = (
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }\n'
    'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 4 '
    'kernel_size: 3 pad: 1 } }\n'
    'layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }\n'
    'layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param { num_output: 4 '
    'kernel_size: 3 pad: 1 } }\n'
    'layer { name: "r2" type: "ReLU" bottom: "c2" top: "c2" }\n'
    'layer { name: "c3" type: "Convolution" bottom: "c2" top: "out" convolution_param { num_output: 2 '
    'kernel_size: 1 } }\n')


def batches(n, seed):
    rng = np.random.default_rng(seed)
    return [{"data": rng.normal(size=SHAPE).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """c2 reads channel 0 of c1, which ReLU keeps at 0, through a tap of 100 per output channel: per-channel
    INT8 weights then have a step of 100/127 and round every other tap (|w| < 0.3) of c2 to 0."""
    tmp = tmp_path_factory.mktemp("fallback_model")
    proto = tmp / "model.prototxt"
    proto.write_text(MODEL)
    rng = np.random.default_rng(0)
    net = Net(str(proto), TEST)
    c1, c2, c3 = (net.layer_dict[n].blobs for n in ("c1", "c2", "c3"))
    c1[0].data[...] = rng.normal(scale=0.4, size=c1[0].data.shape)
    c1[0].data[0] = 0
    c1[1].data[...] = [-1.0, 0.1, 0.1, 0.1]  # channel 0: ReLU(-1) = 0 everywhere
    c2[0].data[...] = rng.uniform(-0.3, 0.3, size=c2[0].data.shape)
    c2[0].data[:, 0, 1, 1] = 100.0
    c2[1].data[...] = 0.05
    c3[0].data[...] = rng.normal(scale=0.5, size=c3[0].data.shape)
    c3[1].data[...] = 0.0
    weights = tmp / "model.caffemodel"
    net.save(str(weights))
    c2[0].data[:, 0, 1, 1] = 0.2  # the same model without the outsized tap
    healthy = tmp / "healthy.caffemodel"
    net.save(str(healthy))
    return proto, weights, healthy


def mean_cosine(ref_net, net, feeds, blob="out"):
    values = []
    for feed in feeds:
        a = ref_net.forward(**feed)[blob].reshape(len(feed["data"]), -1).copy()
        b = net.forward(**feed)[blob].reshape(len(feed["data"]), -1)
        values.append(cosine_rows(a, b))
    return float(np.concatenate(values).mean())


def test_cosine_rows_handles_zero_rows():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, 1.0, 0.0, -1.0])


def additive_score(losses, pair_bonus=None):
    """Cosine 1 - sum of the losses of the quantized layers (minus a bonus when a pair is quantized together)."""
    def score(quantized):
        value = 1.0 - sum(losses[n] for n in quantized)
        if pair_bonus and set(pair_bonus[0]) <= quantized:
            value += pair_bonus[1]
        return value
    return score


def test_search_picks_the_most_sensitive_layers_until_the_target_holds():
    losses = {"a": 1e-5, "b": 3e-3, "c": 2e-4, "d": 5e-3, "e": 1e-6}
    chosen, sensitivity, cos = search_float_layers(additive_score(losses), list(losses), 0.999, 8, progress=False)
    assert chosen == ["d", "b"]
    assert sensitivity == pytest.approx(losses)
    assert cos == pytest.approx(1 - 1e-5 - 2e-4 - 1e-6)


def test_search_gives_back_layers_the_target_does_not_need():
    # The errors of a and d cancel when both are quantized: the greedy float set {d, b, c} reaches the
    # target, and without d in it (d quantized next to a) the target still holds, so d returns to INT8.
    losses = {"a": 1e-5, "b": 3e-3, "c": 1e-3, "d": 5e-3}
    calls = []

    def score(quantized):
        calls.append(frozenset(quantized))
        return additive_score(losses, (("a", "d"), 4.5e-3))(quantized)
    chosen, _, cos = search_float_layers(score, list(losses), 0.999, 8, progress=False)
    assert chosen == ["b", "c"]
    # 4 single layers, all 4, greedy float {d}, {d, b} ({d, b, c} leaves {a}: known), prune b and d
    # (pruning c leaves float {d, b}: known)
    assert len(calls) == len(set(calls)) == 4 + 1 + 2 + 2
    assert cos == pytest.approx(1 - 1e-5 - 5e-3 + 4.5e-3)


def test_search_returns_the_best_set_when_the_target_is_out_of_reach():
    losses = {"a": 4e-3, "b": 3e-3, "c": 2e-3, "d": 1e-3}
    chosen, _, cos = search_float_layers(additive_score(losses), list(losses), 0.99999, 2, progress=False)
    assert chosen == ["a", "b"]
    assert cos == pytest.approx(1 - 3e-3)
    chosen, _, _ = search_float_layers(additive_score(losses), list(losses), 0.99999, 0, progress=False)
    assert chosen == []


def test_an_unreachable_target_is_logged_with_its_digits(caplog):
    """The warning printed cosines with six decimals: 'do not reach output cosine 1.000000 (best 1.000000)'."""
    losses = {"a": 4e-9, "b": 3e-9}
    with caplog.at_level("WARNING", logger="amct_caffe"):
        search_float_layers(additive_score(losses), list(losses), 0.9999999999, 1, progress=False)
    assert "do not reach output cosine 0.9999999999 (best 0.999999997," in caplog.text


def test_fallback_keeps_the_broken_layer_float_and_saves_what_the_ordinary_flow_gives(model, tmp_path):
    proto, weights, _ = model
    calib, evaluation = batches(2, seed=1), batches(3, seed=2)
    res = calibrate_with_fallback(str(proto), str(weights), calib, str(tmp_path / "fb/m"), 2,
                                  eval_batches=evaluation, target_cosine=0.999, progress=False)
    assert res.float_layers == ["c2"]
    assert max(res.sensitivity, key=res.sensitivity.get) == "c2"
    assert res.sensitivity["c2"] > 0.01 > max(v for k, v in res.sensitivity.items() if k != "c2")
    assert res.cosine_int8 < 0.99 and res.target_met

    fp32 = Net(str(proto), str(weights), TEST)
    fq = Net(res.outputs["fake_quant_model"], res.outputs["fake_quant_weights"], TEST)
    assert res.cosine_final == pytest.approx(mean_cosine(fp32, fq, evaluation), abs=1e-12)
    assert "c2_quant" not in fq.layer_dict and "c1_quant" in fq.layer_dict  # c2 float, c1 INT8

    _c2_float_and_the_ordinary_flow_gives_the_files(res, proto, weights, calib, tmp_path)


def _c2_float_and_the_ordinary_flow_gives_the_files(res, proto, weights, calib, tmp_path):
    config = json.loads(Path(res.outputs["fallback_config"]).read_text())
    assert config["c2"]["quant_enable"] is False and config["c1"]["quant_enable"] is True
    # The written config through the ordinary flow gives the same files, byte for byte.
    plain = calibrate(str(proto), str(weights), iter(calib), str(tmp_path / "plain/m"), 2,
                      config_file=res.outputs["fallback_config"], progress=False)
    for kind in ("fake_quant_weights", "deploy_weights", "quant_param_record_txt"):
        assert Path(plain[kind]).read_bytes() == Path(res.outputs[kind]).read_bytes(), kind


def test_fallback_goes_on_while_the_guides_factors_miss_the_target(model, tmp_path, monkeypatch):
    """The search's factors are observed on the float model; where they meet the target and the guide's do not,
    the next most sensitive layers go float until the saved model meets it."""
    import amct_caffe.api.fallback as fallback

    search = fallback.search_float_layers
    seen = {}

    def optimistic(score, layers, target_cosine, max_float_layers, progress=True):  # as if the search were met
        result = search(score, layers, -1.0, max_float_layers, progress)
        seen["chosen"] = list(result[0])
        return result
    monkeypatch.setattr(fallback, "search_float_layers", optimistic)
    proto, weights, _ = model
    calib, evaluation = batches(2, seed=1), batches(3, seed=2)
    res = calibrate_with_fallback(str(proto), str(weights), calib, str(tmp_path / "fb/m"), 2,
                                  eval_batches=evaluation, target_cosine=0.999, progress=False)
    assert seen["chosen"] == [] and res.cosine_int8 < 0.99
    assert res.float_layers == ["c2"] and res.target_met  # (c2 tried quantized again: the target needs it float)
    _c2_float_and_the_ordinary_flow_gives_the_files(res, proto, weights, calib, tmp_path)
    # with no room for a float layer, the result says the target is missed
    res = calibrate_with_fallback(str(proto), str(weights), calib, str(tmp_path / "none/m"), 2,
                                  eval_batches=evaluation, target_cosine=0.999, max_float_layers=0, progress=False)
    assert res.float_layers == [] and not res.target_met


def test_fallback_without_need_is_the_ordinary_calibration(model, tmp_path):
    proto, _, healthy = model
    calib = batches(2, seed=1)
    res = calibrate_with_fallback(str(proto), str(healthy), calib, str(tmp_path / "fb/m"), 2, target_cosine=0.999,
                                  progress=False)
    assert res.float_layers == [] and res.sensitivity == {}
    assert res.cosine_int8 >= 0.999 and res.cosine_final == pytest.approx(res.cosine_int8, abs=1e-12)
    config = json.loads(Path(res.outputs["fallback_config"]).read_text())
    assert all(config[n]["quant_enable"] for n in ("c1", "c2", "c3"))
    plain = calibrate(str(proto), str(healthy), iter(calib), str(tmp_path / "plain/m"), 2, progress=False)
    for kind in ("fake_quant_weights", "deploy_weights", "quant_param_record_txt"):
        assert Path(plain[kind]).read_bytes() == Path(res.outputs[kind]).read_bytes(), kind


@pytest.mark.parametrize("kwargs, message", [
    ({"target_cosine": 1.5}, "target_cosine must be a number in (0, 1], got 1.5"),
    ({"max_float_layers": -1}, "max_float_layers must be an integer >= 0"),
    ({"eval_batches": []}, "eval_batches: no batch given"),
    ({"target_cosine": "0.9"}, "target_cosine must be a number in (0, 1], got '0.9'"),
    ({"eval_batches": [{"data": np.zeros((0, 3, 8, 8), np.float32)}]},
     "eval_batches: batch 0: input 'data' holds no sample (shape [0, 3, 8, 8])"),
    ({"eval_batches": [{"data": np.array(["a"])}]},
     "eval_batches: batch 0: input 'data' holds <U1 values, not numbers"),
    ({"eval_batches": [None]}, "eval_batches: batch 0 is None, not a {input blob: array} mapping"),
    ({"eval_batches": [{"data": np.full((2, 3, 8, 8), np.nan, np.float32)}]},
     "eval_batches: batch 0: input 'data' holds NaN or infinite values"),
    ({"compare_blobs": ["nope"]}, "compare_blobs ['nope'] are not blobs of the float model"),
    ({"compare_blobs": "prob"}, "compare_blobs must be a list of blob names, got the string 'prob': write ['prob']"),
    ({"config_file": "/nonexistent/config.json"}, "config_file /nonexistent/config.json does not exist"),
])
def test_fallback_rejects_bad_arguments_before_writing(model, tmp_path, kwargs, message):
    proto, weights, _ = model
    with pytest.raises(AmctError) as err:
        calibrate_with_fallback(str(proto), str(weights), batches(1, seed=1), str(tmp_path / "m"), 1,
                                progress=False, **kwargs)
    assert message in str(err.value)
    assert not list(tmp_path.iterdir())


class FakeNet:
    """Outputs 'big' (magnitude 100) and 'small' (magnitude 1) computed from the input, optionally perturbed."""

    def __init__(self, small_error=0.0):
        self.outputs = ["big", "small"]
        self.small_error = small_error
        self.blobs = dict.fromkeys(self.outputs)  # named before any forward, as in a Net

    def forward(self, **feed):
        x = feed["data"].reshape(len(feed["data"]), -1).astype(np.float64)
        small = x[:, :4] + self.small_error * x[:, 4:8]
        self.blobs = {"big": types.SimpleNamespace(data=100 * x), "small": types.SimpleNamespace(data=small)}
        return self.blobs


def test_comparator_worst_output_sees_what_concatenation_hides():
    from amct_caffe.api.fallback import OutputComparator

    feeds = batches(2, seed=5)
    worst = OutputComparator(FakeNet(), feeds)
    concat = OutputComparator(FakeNet(), feeds, metric="all_outputs")
    off = FakeNet(small_error=0.5)
    per_blob = worst.per_output(off)
    assert per_blob["big"] == pytest.approx(1.0, abs=1e-12)
    flat = [b["data"].reshape(4, -1).astype(np.float64) for b in feeds]
    ref_small = [x[:, :4] for x in flat]
    got_small = [x[:, :4] + 0.5 * x[:, 4:8] for x in flat]
    expected = np.concatenate([cosine_rows(r, g) for r, g in zip(ref_small, got_small, strict=True)]).mean()
    assert per_blob["small"] == pytest.approx(expected, abs=1e-12) and expected < 0.95
    assert worst.cosine(off) == pytest.approx(expected, abs=1e-12)
    assert concat.cosine(off) > 0.9999  # the big output dominates the concatenation
    with pytest.raises(AmctError, match="metric must be one of worst_output, all_outputs"):
        OutputComparator(FakeNet(), feeds, metric="mean")


def build_random(tmp, text, seed=0):
    """A model with N(0, 0.4) weights; BatchNorm statistics mean 0.2, var 1.5 (not those of the data)."""
    proto = tmp / "m.prototxt"
    proto.write_text(text)
    net = Net(str(proto), TEST)
    rng = np.random.default_rng(seed)
    for layer in net.layer_dict.values():
        for i, blob in enumerate(layer.blobs):
            blob.data[...] = ([0.2, 1.5, 1.0][i] if layer.type == "BatchNorm"
                              else rng.normal(scale=0.4, size=blob.data.shape))
    weights = tmp / "m.caffemodel"
    net.save(str(weights))
    return proto, weights


INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }\n'


def edited_config(tmp, proto, weights, edit):
    import amct_caffe as amct

    path = tmp / "config.json"
    amct.create_quant_config(str(path), str(proto), str(weights), batch_num=2)
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return path


def test_fallback_of_an_snq_layer_means_its_original_weights(tmp_path):
    """A layer the search leaves float must be evaluated with its float weights, not SNQ's 16 centres:
    otherwise floating the 4-bit layer seems to change nothing and the whole budget goes float."""
    proto, weights = build_random(tmp_path, INPUT + (
        'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 16 '
        'kernel_size: 3 pad: 1 } }\nlayer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }\n'
        'layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param { num_output: 8 '
        'kernel_size: 3 pad: 1 } }\nlayer { name: "r2" type: "ReLU" bottom: "c2" top: "c2" }\n'
        'layer { name: "c3" type: "Convolution" bottom: "c2" top: "out" convolution_param { num_output: 4 '
        'kernel_size: 1 } }\n'))

    def snq(c):
        c["c2"]["weight_quant_params"] = {"wts_algo": "snq_quantize", "channel_wise": True, "num_bits": 4,
                                          "max_iteration": 500, "min_distance": 1e-6, "init_algo": "uniform"}
    config = edited_config(tmp_path, proto, weights, snq)
    calib = [{"data": b["data"] * 2 + 0.5} for b in batches(2, seed=1)]
    res = calibrate_with_fallback(str(proto), str(weights), calib, str(tmp_path / "fb/m"), 2, target_cosine=0.9999,
                                  max_float_layers=3, config_file=str(config), progress=False)
    assert res.float_layers == ["c2"]
    assert res.cosine_int8 < 0.999 and res.target_met


def test_fallback_with_update_bn_models_float_layers_with_their_own_statistics(tmp_path):
    """update_bn refreshes the BatchNorm statistics behind quantized weights; a layer left float keeps the
    stored ones. The search must model that, and never let its own calibration overwrite the dumps the
    guide's flow refreshed."""
    proto, weights = build_random(tmp_path, INPUT + (
        'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 '
        'kernel_size: 3 pad: 1 } }\nlayer { name: "bn1" type: "BatchNorm" bottom: "c1" top: "c1" }\n'
        'layer { name: "sc1" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true } }\n'
        'layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }\n'
        'layer { name: "c2" type: "Convolution" bottom: "c1" top: "out" convolution_param { num_output: 4 '
        'kernel_size: 3 pad: 1 } }\n'))

    def update_bn(c):
        c["update_bn"] = True
        c["bn_update_config"] = {"bn_update_iterations": 2, "bn_moving_average_fraction": 0.5,
                                 "bn_dump_dir": str(tmp_path / "bn")}
    config = edited_config(tmp_path, proto, weights, update_bn)
    calib = [{"data": b["data"] * 2 + 0.5} for b in batches(2, seed=1)]
    res = calibrate_with_fallback(str(proto), str(weights), calib, str(tmp_path / "fb/m"), 2, target_cosine=0.99,
                                  max_float_layers=2, config_file=str(config), progress=False)
    assert res.float_layers == ["c1"] and res.cosine_int8 < 0.9 and res.cosine_final > 0.999
    # A target out of reach with no float layer allowed: the saved model is the ordinary flow's.
    res = calibrate_with_fallback(str(proto), str(weights), calib, str(tmp_path / "fb0/m"), 2, target_cosine=1.0,
                                  max_float_layers=0, config_file=str(config), progress=False)
    assert res.float_layers == [] and not res.target_met
    plain = calibrate(str(proto), str(weights), iter(calib), str(tmp_path / "plain/m"), 2, config_file=str(config),
                      progress=False)
    for kind in ("fake_quant_weights", "deploy_weights", "quant_param_record_txt"):
        assert Path(plain[kind]).read_bytes() == Path(res.outputs[kind]).read_bytes(), kind


def test_fallback_reports_outputs_whose_size_changes(model, tmp_path, monkeypatch):
    from amct_caffe.api.fallback import OutputComparator

    class Varying(FakeNet):
        def forward(self, **feed):
            super().forward(**feed)
            self.blobs["small"] = types.SimpleNamespace(data=np.zeros((1, 3)))
            return self.blobs
    comparator = OutputComparator(FakeNet(), batches(1, seed=3))
    with pytest.raises(AmctError, match="output 'small' has 3 value"):
        comparator.cosine(Varying())


def test_fallback_checks_save_path_and_config_before_any_work(model, tmp_path):
    proto, weights, _ = model
    with pytest.raises(AmctError, match="must end with a model name prefix"):
        calibrate_with_fallback(str(proto), str(weights), batches(1, seed=1), str(tmp_path) + "/", 1, progress=False)
    clash = tmp_path / "m_fallback_config.json"
    clash.write_text("{}")
    with pytest.raises(AmctError, match="is also where the fallback config goes"):
        calibrate_with_fallback(str(proto), str(weights), batches(1, seed=1), str(tmp_path / "m"), 1,
                                config_file=str(clash), progress=False)
    assert clash.read_text() == "{}"


def test_fallback_meets_a_target_on_the_users_own_metric(model, tmp_path):
    """evaluator(net) -> float replaces the output cosine: here a metric that only the float c3 satisfies,
    which the cosine would never single out (c2 is the layer that hurts the outputs)."""
    proto, weights, _ = model
    seen = []

    def evaluator(net):
        seen.append(sorted(n for n in net.layer_dict if n.endswith("_quant")))
        return 0.0 if "c3_quant" in net.layer_dict else 1.0

    res = calibrate_with_fallback(str(proto), str(weights), batches(2, seed=1), str(tmp_path / "fb/m"), 2,
                                  evaluator=evaluator, target=0.5, progress=False)
    assert res.float_layers == ["c3"] and res.cosine_int8 == 0.0 and res.cosine_final == 1.0 and res.target_met
    assert res.sensitivity == {"c1": 0.0, "c2": 0.0, "c3": 1.0}
    assert ["c1_quant", "c2_quant", "c3_quant"] in seen  # the metric saw the fully quantized model first
    fq = Net(res.outputs["fake_quant_model"], res.outputs["fake_quant_weights"], TEST)
    assert "c3_quant" not in fq.layer_dict and "c2_quant" in fq.layer_dict


def test_a_final_measurement_that_fails_leaves_the_previous_outputs(model, tmp_path):
    """The saved model is measured before it replaces the previous run's files: an evaluator failing there
    (or an interrupt) used to delete them all."""
    proto, weights, _ = model
    save = tmp_path / "fb/m"
    first = calibrate_with_fallback(str(proto), str(weights), batches(2, seed=1), str(save), 2,
                                    evaluator=lambda net: 1.0, target=0.5, progress=False)
    before = {p: Path(p).read_bytes() for p in first.outputs.values()}
    calls = []

    def failing_at_the_end(net):
        calls.append(net)
        if len(calls) == 2:  # the first measures the INT8 model (target met), the second the saved one
            raise RuntimeError("evaluation failed")
        return 1.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        calibrate_with_fallback(str(proto), str(weights), batches(2, seed=2), str(save), 2,
                                evaluator=failing_at_the_end, target=0.5, progress=False)
    assert sorted(str(p) for p in save.parent.iterdir()) == sorted(before)
    assert all(Path(p).read_bytes() == data for p, data in before.items())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"evaluator": lambda net: 1.0}, "evaluator needs target"),
    ({"evaluator": lambda net: 1.0, "target": float("nan")}, "evaluator needs target"),
    ({"evaluator": "top1", "target": 0.7}, "evaluator must be a function"),
    ({"evaluator": lambda net: "high", "target": 0.7}, "evaluator returned 'high', not a number"),
])
def test_fallback_evaluator_errors(model, tmp_path, kwargs, message):
    proto, weights, _ = model
    with pytest.raises(AmctError, match=message):
        calibrate_with_fallback(str(proto), str(weights), batches(2, seed=1), str(tmp_path / "fb/m"), 2,
                                progress=False, **kwargs)


def _optimistic_search(monkeypatch):
    """search_float_layers as if its own factors met the target with every layer quantized."""
    import amct_caffe.api.fallback as fallback

    search = fallback.search_float_layers
    monkeypatch.setattr(fallback, "search_float_layers", lambda score, layers, target, most, progress=True:
                        search(score, layers, -1.0, most, progress))


def test_fallback_with_update_bn_saves_the_statistics_of_the_set_it_keeps(model, tmp_path, monkeypatch):
    """Each calibration of step 5 refreshes the BatchNorm dumps; after a rejected trial the kept set is
    calibrated again, so the saved models are what its config gives."""
    _optimistic_search(monkeypatch)
    text = MODEL + ('layer { name: "bn3" type: "BatchNorm" bottom: "out" top: "out" }\n'
                    'layer { name: "sc3" type: "Scale" bottom: "out" top: "out" scale_param { bias_term: true } }\n')
    proto, weights, _ = model
    net = Net(str(proto), str(weights), TEST)
    (tmp_path / "bn.prototxt").write_text(text)
    with_bn = Net(str(tmp_path / "bn.prototxt"), TEST)
    for name, layer in net.layer_dict.items():
        for mine, theirs in zip(with_bn.layer_dict[name].blobs, layer.blobs, strict=True):
            mine.data[...] = theirs.data
    for blob, value in zip(with_bn.layer_dict["bn3"].blobs, (0.2, 1.5, 1.0), strict=True):
        blob.data[...] = value
    with_bn.layer_dict["sc3"].blobs[0].data[...] = 1.0
    with_bn.save(str(tmp_path / "bn.caffemodel"))
    proto, weights = tmp_path / "bn.prototxt", tmp_path / "bn.caffemodel"
    config = edited_config(tmp_path, proto, weights, lambda c: c.update(
        update_bn=True, bn_update_config={"bn_update_iterations": 2, "bn_moving_average_fraction": 0.5,
                                          "bn_dump_dir": str(tmp_path / "bn_dump")}))
    calib = batches(2, seed=1)
    res = calibrate_with_fallback(str(proto), str(weights), calib, str(tmp_path / "fb/m"), 2,
                                  eval_batches=batches(3, seed=2), target_cosine=0.97, config_file=str(config),
                                  progress=False)
    assert res.float_layers == ["c2"] and res.target_met  # (all INT8 tried again last: rejected)
    _c2_float_and_the_ordinary_flow_gives_the_files(res, proto, weights, calib, tmp_path)


def test_fallback_out_of_reach_keeps_the_best_set_it_calibrated(model, tmp_path, monkeypatch):
    _optimistic_search(monkeypatch)
    proto, weights, _ = model
    quantized_share = lambda net: sum(name.endswith("_quant") for name in net.layer_dict) / 10  # noqa: E731
    res = calibrate_with_fallback(str(proto), str(weights), batches(2, seed=1), str(tmp_path / "fb/m"), 2,
                                  evaluator=quantized_share, target=0.5, progress=False)
    assert res.float_layers == [] and res.cosine_final == res.cosine_int8 == 0.3 and not res.target_met


def test_fallback_whose_last_measurement_fails_leaves_no_files(model, tmp_path):
    proto, weights, _ = model
    calls = []

    def evaluator(net):
        calls.append(1)
        if len(calls) == 2:  # the saved model's measurement (the first: every layer quantized, target met)
            raise RuntimeError("labels unreadable")
        return 1.0
    with pytest.raises(RuntimeError, match="labels unreadable"):
        calibrate_with_fallback(str(proto), str(weights), batches(2, seed=1), str(tmp_path / "fb/m"), 2,
                                evaluator=evaluator, target=0.5, progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_nan_weights_are_refused_before_the_float_net_loads_them(tmp_path, caplog):
    """The float reference net loads NaN weights with a warning (as Caffe runs them); the fallback then refused
    them, so the user read a warning that they are computed and an error that they cannot be."""
    import logging

    from amct_caffe import io
    from amct_caffe.errors import WeightsError
    from tests.test_cli import LENET, LENET_WEIGHTS

    net = io.read_caffemodel(LENET_WEIGHTS)
    next(layer for layer in net.layer if layer.name == "ip1").blobs[1].data[3] = float("nan")
    weights = tmp_path / "nan.caffemodel"
    weights.write_bytes(net.SerializeToString())
    x = np.zeros((64, 1, 28, 28), np.float32)
    caplog.set_level(logging.WARNING, logger="amct_caffe")
    with pytest.raises(WeightsError, match="nan.caffemodel: layer 'ip1' blob 1 holds NaN/Inf"):
        calibrate_with_fallback(str(LENET), str(weights), [{"data": x}], str(tmp_path / "out" / "m"), batch_num=1,
                                progress=False)
    assert not any("as Caffe does" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "out").exists()
