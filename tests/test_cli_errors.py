"""amct-caffe never shows a traceback: every bad input is one line on stderr and exit status 2.

Each case here once ended in a traceback (or a wrong result); the calibrate API is faked, so the
cases check what the command line does before (and instead of) any quantization work.
"""

import re
import struct
import sys
import types
import zlib

import numpy as np
import pytest

from amct_caffe import cli
from tests.data.common import IMAGENET, needs_imagenet
from tests.golden import MODELS

from .test_cli import LENET, LENET_WEIGHTS, MNIST_SAMPLE

MNIST_500 = MNIST_SAMPLE / "mnist_500.npz"
RUN = ["run", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--no-progress"]
CALIBRATE = ["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--output", "q", "--no-progress"]


pytestmark = pytest.mark.usefixtures("cli_scratch_dir")


@pytest.fixture
def fake_calibrate(monkeypatch):
    calls = []

    def calibrate(model_file, weights_file, batches, save_path, batch_num, **kwargs):
        calls.append([dict(b) for b in batches])
        return {"deploy_model": f"{save_path}_deploy_model.prototxt"}

    module = types.ModuleType("amct_caffe.api.workflow")
    module.calibrate = calibrate
    monkeypatch.setitem(sys.modules, "amct_caffe.api.workflow", module)
    return calls


def fails(capsys, argv, pattern: str, prefix: str = "error: ") -> str:
    """main(argv) returns 2 after printing exactly one line, matching ``pattern``, on stderr."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.match(f"amct-caffe: {prefix}", err) and re.search(pattern, err), (pattern, err)
    return err


def refused(capsys, argv, pattern: str) -> None:
    """The argument parser refuses ``argv`` (usage and one error line, exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- run
def test_run_input_files_that_are_not_arrays(capsys, tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object))  # unpickling runs code
    (tmp_path / "text.npy").write_text("1 2 3\n")
    np.savez(tmp_path / "labels_only.npz", labels=np.arange(4))  # was StopIteration
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 1, 28, 28)), b=np.ones((4, 1, 28, 28)))  # was: 'a' picked
    np.savez(tmp_path / "shape.npz", data=np.zeros((4, 3, 5, 5)))
    zipped = (tmp_path / "two.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(zipped[:len(zipped) // 2])  # was BadZipFile
    (tmp_path / "folder.npz").mkdir()
    cases = [("objects.npy", "objects.npy holds Python objects"),
             ("text.npy", "text.npy is not a .npy file"),
             ("labels_only.npz", "no array named 'data'; it holds 'labels'"),
             ("two.npz", "no array named 'data'; it holds 'a', 'b'"),
             ("shape.npz", r"samples of shape \(3, 5, 5\) do not fit input 'data'"),
             ("cut.npz", r"cut.npz: cannot read the arrays \(zipfile.BadZipFile"),
             ("folder.npz", "folder.npz is a directory, not a file"),
             ("missing.npz", "missing.npz does not exist")]
    for name, message in cases:
        fails(capsys, RUN + ["--input", name], message)


def test_run_labels_that_do_not_fit(capsys, tmp_path):
    images = np.zeros((4, 1, 28, 28), np.uint8)
    np.savez(tmp_path / "short.npz", data=images, labels=np.arange(2))  # was IndexError
    np.savez(tmp_path / "words.npz", data=images, labels=np.array(list("abcd")))  # was: accuracy 0%
    for name in ("short.npz", "words.npz"):
        fails(capsys, RUN + ["--input", name], r"'labels' must hold one number per sample \(4\)")


def test_run_option_values(capsys):
    data = RUN + ["--input", str(MNIST_500)]
    for bad, message in [(["--batch-size", "-1"], "--batch-size: expected a positive integer"),
                         (["--batch-size", "0"], "--batch-size: expected a positive integer"),
                         (["--limit", "-1"], "--limit: expected a positive integer"),
                         (["--top-k", "0"], "--top-k: expected a positive integer"),
                         (["--show", "-1"], "--show: expected an integer >= 0"),
                         (["--scale", "nan"], "--scale: expected a finite number")]:
        refused(capsys, data + bad, message)
    fails(capsys, data + ["--output", "nope"], r"--output nope: .*lenet.prototxt has no blob .*\(its outputs: prob\)")
    fails(capsys, data + ["--top-k", "11"], "--top-k 11: blob 'prob' has 10 value")


def test_run_limit_and_batches_that_do_not_divide(capsys):
    """--limit 7 with batches of 3 once ran 9 samples and failed comparing them with 7 labels."""
    assert cli.main(RUN + ["--input", str(MNIST_500), "--limit", "7", "--batch-size", "3", "--show", "0",
                           "--scale", "0.00390625"]) == 0
    assert capsys.readouterr().out == "top-1 accuracy on 7 samples: 100.00%\n"


def test_run_ranks_any_blob(capsys):
    """--output names any blob, not only the net's outputs (forward returned only those: KeyError)."""
    assert cli.main(RUN + ["--input", str(MNIST_500), "--output", "ip2", "--top-k", "1", "--show", "1",
                           "--scale", "0.00390625"]) == 0
    assert re.match(r"sample 0: top-1 \[0:\d+\.\d{4}\]  label 0\n", capsys.readouterr().out)


# ------------------------------------------------------------------------------------- calibrate
def test_calibrate_files_that_are_missing_or_folders(capsys, tmp_path, fake_calibrate):
    (tmp_path / "folder").mkdir()
    data = ["--data", str(MNIST_500)]
    model, weights = ["--model", str(LENET)], ["--weights", str(LENET_WEIGHTS)]
    for argv, message in [
        (["calibrate", "--model", "folder", *weights, "--output", "q", *data], "model file folder is a directory"),
        (["calibrate", *model, "--weights", "folder", "--output", "q", *data], "weights file folder is a directory"),
        (["calibrate", *model, "--weights", "no.caffemodel", "--output", "q", *data],
         "weights file no.caffemodel does not exist"),
        (CALIBRATE + data + ["--config", "folder"], "--config folder is a directory"),
        (["convert", *model, *weights, "--record", "folder", "--output", "q"], "record file folder is a directory"),
    ]:
        fails(capsys, argv, message)
    assert fake_calibrate == []


def test_calibrate_output_prefix_checked_before_any_work(capsys, tmp_path, fake_calibrate):
    (tmp_path / "file").write_text("")
    data = ["--data", str(MNIST_500), "--batch-size", "2"]
    base = ["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--no-progress", *data]
    fails(capsys, base + ["--output", "out/"], "--output out/: end it with a file name prefix")
    fails(capsys, base + ["--output", "file/sub/q"], "--output file/sub/q: file is a file, not a folder")
    assert fake_calibrate == []


def test_calibrate_damaged_array_files(capsys, tmp_path, fake_calibrate):
    np.savez_compressed(tmp_path / "ok.npz", data=np.zeros((8, 1, 28, 28), np.float32))
    damaged = bytearray((tmp_path / "ok.npz").read_bytes())
    damaged[30:120] = bytes(90)  # the member's compressed header: tokenize.TokenError / zlib.error
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    np.save(tmp_path / "objects.npy", np.array([object()]), allow_pickle=True)
    for name in ("damaged.npz", "objects.npy"):
        fails(capsys, CALIBRATE + ["--data", name], f"{name}")
    assert fake_calibrate == []


def _bomb_png(path) -> None:
    """A PNG whose header claims 60000 x 60000 pixels: Pillow raises DecompressionBombError (no OSError)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))


def test_calibrate_image_folders_that_cannot_feed_the_net(capsys, tmp_path, fake_calibrate):
    for name in ("empty", "bomb", "text"):
        (tmp_path / name).mkdir()
    _bomb_png(tmp_path / "bomb/a.png")
    (tmp_path / "text/a.jpg").write_text("not an image")
    fails(capsys, CALIBRATE + ["--data", "empty"], "empty holds no calibration data")
    fails(capsys, CALIBRATE + ["--data", "bomb", "--batch-size", "1"],
          r"a.png: cannot read the image \(PIL.Image.DecompressionBombError")
    fails(capsys, CALIBRATE + ["--data", "text", "--batch-size", "1"], "a.jpg: cannot read the image")
    assert fake_calibrate == []


@needs_imagenet
def test_calibrate_resize_too_large_is_refused_before_allocating(capsys, tmp_path, fake_calibrate):
    (tmp_path / "one").mkdir()
    (tmp_path / "one/a.jpg").write_bytes(sorted(IMAGENET.iterdir())[0].read_bytes())
    base = ["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--output", "q", "--data", "one",
            "--batch-size", "1", "--no-progress"]
    for resize in (["3000000000", "2"], ["99999999999999999999"]):  # were OverflowError
        fails(capsys, base + ["--resize", *resize, "--crop", "28"], "exceeds Pillow's image size limit")
    assert fake_calibrate == []


def test_calibrate_lmdb_that_is_damaged_or_not_an_lmdb(capsys, tmp_path, fake_calibrate):
    lmdb = pytest.importorskip("lmdb")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake/data.mdb").write_bytes(b"not an lmdb " * 1000)
    fails(capsys, CALIBRATE + ["--data", "fake"], "cannot open the LMDB")
    with lmdb.open(str(tmp_path / "damaged"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i in range(300):
            txn.put(b"%08d" % i, bytes(500))
    mdb = tmp_path / "damaged/data.mdb"
    pages = bytearray(mdb.read_bytes())
    rng = np.random.default_rng(0)
    for offset in range(8192, len(pages), 4096):  # every page after the two meta pages
        pages[offset + 16:offset + 400] = rng.bytes(384)
    mdb.write_bytes(bytes(pages))
    fails(capsys, CALIBRATE + ["--data", "damaged"], "the LMDB .*damaged.* is damaged or not a Caffe LMDB")
    assert fake_calibrate == []


def test_calibrate_malformed_option_values(capsys, tmp_path, fake_calibrate):
    np.savez(tmp_path / "d.npz", data=np.zeros((4, 1, 28, 28), np.float32))
    (tmp_path / "bad.json").write_text("{data: 1")
    (tmp_path / "dup.json").write_text('{"data": {"std": [2]}, "data": {"std": [3]}}')
    (tmp_path / "text_std.json").write_text('{"data": {"std": "12"}}')  # was read as std (1, 2)
    (tmp_path / "float_size.json").write_text('{"data": {"size": 5.5}}')  # was TypeError
    base = CALIBRATE + ["--data", "d.npz"]
    for extra, message in [
        (["--input-shape", "data:1,x"], "--input-shape data:1,x: expected positive integers"),  # was shape (1,)
        (["--input-shape", "data:1,,28,28"], "expected positive integers"),
        (["--select", "1:2:3:4"], "--select 1:2:3:4: expected START:STOP:STEP"),
        (["--preprocess", "bad.json"], "--preprocess bad.json: not valid JSON"),
        (["--preprocess", "dup.json"], "--preprocess dup.json: key .data. appears twice"),
        (["--preprocess", "text_std.json"], r"--preprocess text_std.json: 'data': Preprocess.std: expected numbers"),
        (["--preprocess", "float_size.json"], "--preprocess float_size.json: 'data': Preprocess.size"),
        (["--preprocess", "missing.json"], "--preprocess missing.json does not exist"),
        (["--preprocess", '{"data": {"size": [28, 28]}}'], "--preprocess takes the path of a JSON file, not the JSON"),
        (["--preprocess", "/dev/zero"], "--preprocess /dev/zero is not a regular file"),  # was: read forever
        (["--config", "/dev/null"], "--config /dev/null is not a regular file"),
        (["--resize", "1", "2", "3"], "--resize takes one value"),
        (["--crop", "1", "2", "3"], "--crop takes one value"),
        (["--std", "1", "0", "2"], "--std 1 0 2: every value must be non-zero"),  # was 'Preprocess.std: ...'
    ]:
        fails(capsys, base + extra, message)
    refused(capsys, base + ["--mean", "inf"], "--mean: expected a finite number")
    refused(capsys, base + ["--max-float-layers", "²"], "--max-float-layers")  # '²'.isdigit(), int('²') fails
    assert fake_calibrate == []


def test_nul_byte_in_any_argument_is_one_line(capsys, fake_calibrate):
    """argv from a shell cannot hold NUL, main(argv) can: os.stat's "embedded null byte" ValueError."""
    data = ["--data", str(MNIST_500), "--batch-size", "2"]
    model, weights = ["--model", str(LENET)], ["--weights", str(LENET_WEIGHTS)]
    for argv, flag in [(["calibrate", *model, *weights, *data, "--output", "out/q\0"], "--output"),
                       (["calibrate", "--model", "a\0b", *weights, *data, "--output", "q"], "--model"),
                       (["calibrate", *model, *weights, *data, "--output", "q", "--input-shape", "d\0:1"],
                        "--input-shape"),
                       (RUN + ["--input", "x\0.npz"], "--input")]:
        fails(capsys, argv, f"{flag} '.*\\\\x00.*': contains a NUL character")
    assert fake_calibrate == []


def test_messages_with_control_characters_stay_on_one_line(capsys):
    err = fails(capsys, RUN + ["--input", "two\nlines.npz"], r"two\\nlines.npz does not exist")
    assert err.count("\n") == 1


@pytest.mark.parametrize("path", ["données/été.npz", "데이터.npy"])
def test_unicode_paths_are_named_in_messages(capsys, tmp_path, path):
    (tmp_path / path).parent.mkdir(exist_ok=True)
    (tmp_path / path).write_text("not numpy")
    fails(capsys, RUN + ["--input", path], f"{path} is not a")


# ------------------------------------------------------------------------------------------ main
def test_an_unexpected_exception_is_one_line_naming_it_an_internal_error(capsys, monkeypatch, caplog):
    def broken(args):
        raise ValueError("something the code did not expect")

    monkeypatch.setattr(cli.run, "cmd_run", broken)  # build_parser, run by main, picks it up
    with caplog.at_level("DEBUG", logger="amct_caffe"):
        err = fails(capsys, RUN + ["--input", "x.npz"], "ValueError: something the code did not expect",
                    prefix="internal error: ")
    assert "AMCT_LOG_LEVEL=DEBUG" in err
    (record,) = [r for r in caplog.records if r.name == "amct_caffe.cli"]
    assert record.levelname == "DEBUG" and record.exc_info[0] is ValueError  # the traceback, for DEBUG


@pytest.mark.parametrize(("exc", "message"), [
    (PermissionError(13, "Permission denied", "out/q.json"), r"error: \[Errno 13\] Permission denied: 'out/q.json'"),
    (MemoryError(), "error: out of memory: use a smaller --batch-size"),
])
def test_os_errors_and_memory_errors_are_one_line(capsys, monkeypatch, exc, message):
    def broken(args):
        raise exc

    monkeypatch.setattr(cli.run, "cmd_run", broken)
    fails(capsys, RUN + ["--input", "x.npz"], message)


def test_main_restores_the_signal_handlers(capsys):
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cli.main(RUN + ["--input", "missing.npz"])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_python_layer_whose_module_is_not_found_is_one_line_that_says_what_to_do(capsys, tmp_path):
    """A model ending in a Python layer (post-processing code of the user's) whose module is not on the path:
    the line names the layer and the module and says where Python looks, as Caffe would need it too."""
    model = tmp_path / "m.prototxt"
    model.write_text(LENET.read_text() + '\nlayer { name: "post" type: "Python" bottom: "prob" top: "out" '
                     'python_param { module: "mine" layer: "Post" } }\n')
    fails(capsys, ["run", "--model", str(model), "--weights", str(LENET_WEIGHTS), "--input", str(MNIST_500),
                   "--no-progress"],
          r"layer 'post' \(Python\): cannot import module 'mine' \(No module named 'mine'\); put the directory that "
          r"holds it on PYTHONPATH, as Caffe needs too$")


def test_an_error_in_a_python_layers_code_is_one_line(capsys, tmp_path, monkeypatch):
    """The user's layer raising in its forward: the line names the layer, its class and the exception."""
    (tmp_path / "post_layers.py").write_text(
        "import caffe\n\n\nclass Post(caffe.Layer):\n    def setup(self, bottom, top):\n        pass\n\n"
        "    def reshape(self, bottom, top):\n"
        "        top[0].reshape(*bottom[0].data.shape)\n\n    def forward(self, bottom, top):\n"
        "        raise KeyError('no such class id')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tmp_path / "m.prototxt"
    model.write_text(LENET.read_text() + '\nlayer { name: "post" type: "Python" bottom: "prob" top: "out" '
                     'python_param { module: "post_layers" layer: "Post" } }\n')
    fails(capsys, ["run", "--model", str(model), "--weights", str(LENET_WEIGHTS), "--input", str(MNIST_500),
                   "--no-progress"],
          r"layer 'post' \(Python post_layers.Post\): its forward\(\) raised KeyError: 'no such class id'$")


def test_a_model_without_inputs_is_refused_with_advice_that_helps(capsys, tmp_path):
    """An empty prototxt, or a TRAIN / TEST one reading Data layers, got 'give --input-shape NAME:N,C,H,W', and
    following that advice led to an internal error ('forward() got data for 'data', which is not a blob')."""
    np.savez(tmp_path / "d.npz", data=np.zeros((4, 1, 28, 28), np.float32))
    train_test = MODELS / "lenet_mnist" / "lenet_train_test.prototxt"
    for model in (train_test, tmp_path / "empty.prototxt"):
        (tmp_path / "empty.prototxt").write_text("")
        for extra in ([], ["--input-shape", "data:4,1,28,28"]):
            fails(capsys, ["calibrate", "--model", str(model), "--weights", str(LENET_WEIGHTS), "--data",
                           str(tmp_path / "d.npz"), "--output", str(tmp_path / "q"), "--no-progress", *extra],
                  "the model declares no input .* give the deploy prototxt")
    assert not (tmp_path / "q").exists()


def test_an_input_without_a_shape_is_refused_naming_what_to_add(capsys, tmp_path):
    """An Input layer without input_param: --input-shape overrides declared shapes and cannot stand for a missing one
    (Caffe cannot build such a net either); the message had been the executor's count of shapes, with --help
    promising that the option supplies them."""
    np.savez(tmp_path / "d.npz", data=np.zeros((4, 1, 28, 28), np.float32))
    text = (MNIST_SAMPLE / "lenet.prototxt").read_text()
    start = text.index("layer {")
    end = text.index("layer {", start + 1)
    model = tmp_path / "shapeless.prototxt"
    model.write_text(text[:start] + 'layer { name: "data" type: "Input" top: "data" }\n' + text[end:])
    for extra in ([], ["--input-shape", "data:4,1,28,28"]):
        fails(capsys, ["calibrate", "--model", str(model), "--weights", str(LENET_WEIGHTS), "--data",
                       str(tmp_path / "d.npz"), "--output", str(tmp_path / "q"), "--no-progress", *extra],
              r"the model declares no shape for input 'data': give it one in the prototxt \(input_param \{ shape")
    assert not (tmp_path / "q").exists()


def test_too_little_data_names_the_config_that_sets_the_number_of_batches(capsys, tmp_path):
    """With --cfg giving batch_num, the advice named --batch-num, which the file overrides (following it only
    added a warning that the flag is ignored)."""
    cfg = tmp_path / "q.cfg"
    cfg.write_text("batch_num: 4\n")
    fails(capsys, ["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--data",
                   str(MNIST_SAMPLE / "mnist_500.npz"), "--scale", "0.00390625", "--select", ":100",
                   "--batch-size", "32", "--cfg", str(cfg), "--output", str(tmp_path / "q"), "--no-progress"],
          rf"4 batches of 32 need 128; give more data, or a smaller batch size or number of batches "
          rf"\(--batch-size, or batch_num in {re.escape(str(cfg))}\)")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--model", "m.prototxt"], "the following arguments are required: --weights, --data, --output; "
                                             "`amct-caffe calibrate --help` lists the options"),
    (["inspect", "--model", "m.prototxt", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: COMMAND; `amct-caffe --help` lists the options"),
])
def test_a_usage_error_is_one_line_too(capsys, argv, message):
    """argparse printed its usage block (the top-level one for an unknown option) before the error line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.splitlines() == [f"amct-caffe: error: {err.split('error: ', 1)[1].strip()}"]
    assert message in err and "usage:" not in err, err
