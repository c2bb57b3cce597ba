"""update_bn: BatchNorm statistics refreshed behind the quantized weights (the guide's 非均匀量化 flow)."""

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import AmctError, io
from amct_caffe.io import record
from amct_caffe.runtime import TEST, Net
from tests.api.flow import calibration_model

SHAPE = (8, 3, 8, 8)
INPUT = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 8 dim: 3 dim: 8 dim: 8 } } }\n')
MODEL = INPUT + (
    'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 '
    'kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } '
    'bias_filler { type: "constant" value: 0.1 } } }\n'
    'layer { name: "bn1" type: "BatchNorm" bottom: "c1" top: "c1" }\n'
    'layer { name: "sc1" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true '
    'filler { type: "constant" value: 1.5 } bias_filler { type: "constant" value: 0.2 } } }\n')
ITERATIONS, FRACTION = 20, 0.5  # a trained factor of ~1000 weighs 1000 * 0.5**20 batches at the end


def data(n, seed):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=SHAPE) * 2 + 0.5).astype(np.float32) for _ in range(n)]


def caffe_rule(batches, mean, var, factor, fraction):
    """Caffe's BatchNorm moving-average update (batch_norm_layer.cpp), in float64 NumPy."""
    mean, var, factor = (np.asarray(a, np.float64).copy() for a in (mean, var, factor))
    for x in batches:
        x = np.asarray(x, np.float64)
        m = x.size // x.shape[1]
        factor = factor * fraction + 1
        mean = x.mean(axis=(0, 2, 3)) + fraction * mean
        var = x.var(axis=(0, 2, 3)) * m / (m - 1) + fraction * var
    return mean / factor[0], var / factor[0]


def test_bn_update_layer_follows_caffes_moving_average_rule(tmp_path):
    proto = tmp_path / "u.prototxt"
    proto.write_text(INPUT + f'layer {{ name: "u" type: "BNUpdate" bottom: "data" bn_update_param {{ bn_layer: "b/n" '
                             f'iterations: 3 moving_average_fraction: 0.7 dump_dir: "{tmp_path / "dump"}" }} }}\n')
    net = Net(str(proto), TEST)
    start = [np.array([0.3, -2.0, 5.0], np.float32) * 4, np.array([1.0, 0.5, 9.0], np.float32) * 4,
             np.array([4.0], np.float32)]
    for blob, value in zip(net.layer_dict["u"].blobs, start, strict=True):
        blob.data[...] = value
    batches = data(4, seed=3)
    for i, x in enumerate(batches):
        net.forward(data=x)
        assert (tmp_path / "dump/b%2Fn.npz").exists() == (i >= 2)  # written after `iterations` forwards
    mean, var = caffe_rule(batches[:3], *start, 0.7)  # the fourth forward is ignored
    with np.load(tmp_path / "dump/b%2Fn.npz") as z:
        np.testing.assert_allclose(z["mean"], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z["var"], var, rtol=1e-5)


def make_models(tmp_path):
    """(true, stale): conv+BN+Scale whose BatchNorm statistics are those of the conv output on the data
    (true), or deliberately wrong ones (stale: shifted mean, inflated variance, Caffe-like factor)."""
    proto = tmp_path / "model.prototxt"
    proto.write_text(MODEL)
    net = Net(str(proto), TEST, seed=0)
    conv = np.concatenate([net.forward(data=x, end="c1")["c1"] for x in data(8, seed=10)])
    mean, var = conv.mean(axis=(0, 2, 3)), conv.var(axis=(0, 2, 3))
    paths = {}
    for kind, (m, v, f) in {"true": (mean, var, 1.0), "stale": (mean + 1.5 * np.sqrt(var), var * 3, 999.98)}.items():
        bn = net.layer_dict["bn1"].blobs
        bn[0].data[...], bn[1].data[...], bn[2].data[...] = m * f, v * f, f
        paths[kind] = tmp_path / f"{kind}.caffemodel"
        net.save(str(paths[kind]))
    return proto, paths


def snq(update_bn, dump_dir):
    def edit(c):
        c["c1"]["weight_quant_params"] = {"wts_algo": "snq_quantize", "channel_wise": True, "num_bits": 4,
                                          "max_iteration": 500, "min_distance": 1e-6, "init_algo": "d2sampling"}
        c["update_bn"] = update_bn
        c["bn_update_config"] = {"bn_moving_average_fraction": FRACTION, "bn_update_iterations": ITERATIONS,
                                 "bn_dump_dir": str(dump_dir)}
    return edit


def run(tmp_path, proto, weights, update_bn, forwards=ITERATIONS):
    tmp_path.mkdir()
    graph, mm, mw = calibration_model(tmp_path, proto, weights, batch_num=2,
                                      edit_config=snq(update_bn, tmp_path / "bn_data"))
    net = Net(mm, mw, TEST)
    for x in data(forwards, seed=20):
        net.forward(data=x)
    return graph, tmp_path


def test_update_bn_refreshes_the_stale_statistics_and_fuses_them(tmp_path):
    proto, weights = make_models(tmp_path)
    graph, out = run(tmp_path / "with", proto, weights["stale"], True)
    assert amct.api.calibration.calibration_forwards(graph) == ITERATIONS
    dump = out / "bn_data/bn1.npz"
    assert dump.exists()
    paths = amct.save_model(graph, "Both", str(out / "res/m"))
    graph_off, out_off = run(tmp_path / "without", proto, weights["stale"], False, forwards=2)
    paths_off = amct.save_model(graph_off, "Both", str(out_off / "res/m"))

    test = data(4, seed=99)
    ref = [Net(str(proto), str(weights["true"]), TEST).forward(data=x)["c1"] for x in test]

    def error(p):
        net = Net(p["fake_quant_model"], p["fake_quant_weights"], TEST)
        return float(np.mean([np.abs(net.forward(data=x)["c1"] - r).mean() for x, r in zip(test, ref, strict=True)]))

    err_on, err_off = error(paths), error(paths_off)
    # measured: 0.08 with update_bn, 1.31 without (outputs' mean |value| 1.19)
    assert err_on < 0.25 * err_off, f"mean |fake-quant - FP32|: update_bn {err_on:.4f}, without {err_off:.4f}"
    # the fused, re-quantized SNQ weights keep at most 16 levels per channel, in both saved models
    for kind in ("fake_quant", "deploy"):
        w = io.load_weights(paths[f"{kind}_weights"])["c1"][0]
        assert all(len(np.unique(w[c])) <= 16 for c in range(w.shape[0]))
        assert "bn1" not in io.load_weights(paths[f"{kind}_weights"])
    entry = record.layer_entry(record.read_record(out / "record.txt"), "c1")
    assert len(entry.scale_w) == 6 and not entry.skip_fusion
    deploy = io.load_weights(paths["deploy_weights"])["c1"][0].astype(np.float32)
    fake = io.load_weights(paths["fake_quant_weights"])["c1"][0]
    np.testing.assert_allclose(deploy * np.asarray(entry.scale_w, np.float32)[:, None, None, None], fake,
                               rtol=1e-6, atol=1e-7)


def test_save_model_without_the_dump_names_the_batchnorm(tmp_path):
    proto, weights = make_models(tmp_path)
    graph, _ = run(tmp_path / "short", proto, weights["stale"], True, forwards=ITERATIONS - 1)
    with pytest.raises(AmctError, match=r"BatchNorm layer 'bn1'.*bn_update_iterations \(20\) times"):
        amct.save_model(graph, "Both", str(tmp_path / "res/m"))


def test_dump_files_are_distinct_per_layer_and_belong_to_their_layer(tmp_path):
    """'bn/1' and 'bn_1' once shared one file (a '/' became '_'): each layer got the other's statistics."""
    from amct_caffe.io.bn_dump import bn_dump_path, read_bn_dump, write_bn_dump

    names = ["bn/1", "bn_1", "bn%2F1", "bn 1", "bn\u00e91"]
    paths = [bn_dump_path(tmp_path, n) for n in names]
    assert len(set(paths)) == len(names) and [p.name for p in paths[:2]] == ["bn%2F1.npz", "bn_1.npz"]
    from urllib.parse import unquote
    assert [unquote(p.stem) for p in paths] == names  # reversible
    write_bn_dump(paths[1], np.ones(3), np.ones(3), "bn_1", 2)
    with pytest.raises(AmctError, match=r"holds the statistics of BatchNorm 'bn_1', not of 'bn/1'"):
        read_bn_dump(paths[1], "bn/1", 3, "")


def test_two_batchnorms_whose_names_differ_by_a_slash_keep_their_own_statistics(tmp_path):
    chain = ('layer {{ name: "c{i}" type: "Convolution" bottom: "{bottom}" top: "c{i}" convolution_param {{ '
             'num_output: 3 kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}\n'
             'layer {{ name: "{bn}" type: "BatchNorm" bottom: "c{i}" top: "c{i}" }}\n')
    proto = tmp_path / "m.prototxt"
    proto.write_text(INPUT + chain.format(i=1, bottom="data", bn="bn/1") + chain.format(i=2, bottom="c1", bn="bn_1"))
    net = Net(str(proto), TEST, seed=3)
    for name, scale in (("bn/1", 1.0), ("bn_1", 7.0)):  # stale statistics, different per layer
        blobs = net.layer_dict[name].blobs
        blobs[0].data[...], blobs[1].data[...], blobs[2].data[...] = scale, scale * 4, 1.0
    weights = tmp_path / "m.caffemodel"
    net.save(str(weights))

    def edit(c):
        c["update_bn"] = True
        c["bn_update_config"] = {"bn_moving_average_fraction": 0.5, "bn_update_iterations": 2,
                                 "bn_dump_dir": str(tmp_path / "dump")}
    graph, mm, mw = calibration_model(tmp_path, proto, weights, batch_num=2, edit_config=edit)
    calib = Net(mm, mw, TEST)
    for x in data(2, seed=5):
        calib.forward(data=x[:, :, :, :])
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumps == ["bn%2F1.npz", "bn_1.npz"]
    with np.load(tmp_path / "dump/bn%2F1.npz") as a, np.load(tmp_path / "dump/bn_1.npz") as b:
        assert str(a["bn_layer"]) == "bn/1" and str(b["bn_layer"]) == "bn_1"
        assert not np.allclose(a["mean"], b["mean"])
    amct.save_model(graph, "Both", str(tmp_path / "out/m"))


def _update_bn_config(tmp_path, dump_dir):
    """(model, stale weights, a config of batch_num 2 with update_bn dumping into ``dump_dir``)."""
    import json

    proto, weights = make_models(tmp_path)
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(proto), str(weights["stale"]), batch_num=2)
    c = json.loads(config.read_text())
    snq(True, dump_dir)(c)
    config.write_text(json.dumps(c))
    return proto, weights, config


@pytest.mark.usefixtures("cli_scratch_dir")  # (no log handler left on a closed stream)
def test_a_stale_dump_that_is_an_input_is_refused_not_deleted(tmp_path, capsys):
    """update_bn deletes an earlier run's dumps before calibrating; a file the command reads that sits where a
    dump goes (the data in bn_dump_dir, named after the BatchNorm) is refused there, not deleted."""
    from amct_caffe import cli

    proto, weights, config = _update_bn_config(tmp_path, tmp_path / "mydata")
    (tmp_path / "mydata").mkdir()
    batch = tmp_path / "mydata" / "bn1.npz"
    np.savez(batch, data=np.concatenate(data(3, seed=1)))
    before = batch.read_bytes()
    code = cli.main(["calibrate", "--model", str(proto), "--weights", str(weights["stale"]), "--config", str(config),
                     "--data", str(batch), "--output", str(tmp_path / "out" / "m"), "--no-progress"])
    assert code == 2
    assert f"is the same file as the input --data ({batch})" in capsys.readouterr().err
    assert batch.read_bytes() == before
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("cli_scratch_dir")  # (no log handler left on a closed stream)
def test_the_command_line_draws_the_batches_update_bn_asks_for(tmp_path, capsys):
    """batch_num 2 and bn_update_iterations 20: calibrate draws 20 batches from data holding 21 (it drew
    batch_num and then said the data gave too few); with 5 batches it says how many it needs."""
    from amct_caffe import cli

    proto, weights, config = _update_bn_config(tmp_path, tmp_path / "dumps")
    for batches, code in ((21, 0), (5, 2)):
        samples = tmp_path / f"x{batches}.npy"
        np.save(samples, np.concatenate(data(batches, seed=1)))
        args = ["calibrate", "--model", str(proto), "--weights", str(weights["stale"]), "--config", str(config),
                "--data", str(samples), "--output", str(tmp_path / f"out{batches}" / "m"), "--no-progress",
                "--no-summary"]
        assert cli.main(args) == code
        err = capsys.readouterr().err
        if code:
            assert "calibration needs 20 batch(es)" in err and "the data gave only 5" in err
        else:
            assert (tmp_path / "out21" / "m_deploy_model.prototxt").exists()


def test_a_failed_calibration_takes_its_dumps_with_it(tmp_path, monkeypatch):
    """The dumps the forwards wrote go when the run then fails (here the save): a failed run leaves no files."""
    from amct_caffe.api import workflow

    proto, weights, config = _update_bn_config(tmp_path, tmp_path / "dumps")
    seen = []

    def failing_save(graph, save_type, save_path):
        seen.extend(p.name for p in (tmp_path / "dumps").iterdir())
        raise AmctError("disk full")

    monkeypatch.setattr(workflow, "save_model", failing_save)
    with pytest.raises(AmctError, match="disk full"):
        workflow.calibrate(str(proto), str(weights["stale"]), [{"data": x} for x in data(ITERATIONS, seed=2)],
                           str(tmp_path / "out" / "m"),
                           2, config_file=str(config), progress=False)
    assert seen == ["bn1.npz"]  # written by the forwards, then removed
    assert list((tmp_path / "dumps").iterdir()) == []


@pytest.mark.parametrize("setting, why", [({"do_fusion": False}, "do_fusion is false"),
                                          ({"skip_fusion_layers": ["c1"]}, "only a BatchNorm folded into")])
def test_update_bn_says_which_batchnorms_it_cannot_refresh(tmp_path, caplog, setting, why):
    """update_bn refreshes the BatchNorms it folds into quantized layers; one kept apart (do_fusion false,
    skip_fusion_layers) keeps its statistics, and a warning says so (it was silently ignored)."""
    proto, weights = make_models(tmp_path)
    caplog.set_level("WARNING", logger="amct_caffe")

    def edit(c):
        snq(True, tmp_path / "bn_data")(c)
        c.update(setting)
    graph, _, _ = calibration_model(tmp_path, proto, weights["stale"], batch_num=2, edit_config=edit)
    assert f"update_bn: BatchNorm layer(s) ['bn1'] keep their statistics: {why}" in caplog.text
    assert amct.api.calibration.calibration_forwards(graph) == 2


def test_a_bn_dump_dir_that_is_a_file_is_refused_before_calibration(tmp_path):
    """The guide's bn_dump_dir is a directory: a file there is refused when the calibration model is
    written (it failed at the second calibration forward)."""
    proto, weights = make_models(tmp_path)
    (tmp_path / "bn_data").write_text("a user's file")
    with pytest.raises(AmctError, match=r"bn_dump_dir .*bn_data is a file, not a directory"):
        calibration_model(tmp_path, proto, weights["stale"], batch_num=2, edit_config=snq(True, tmp_path / "bn_data"))
    assert (tmp_path / "bn_data").read_text() == "a user's file"
