"""amct-caffe as a process: Ctrl-C and SIGTERM clean up, a closed stdout, what reaches the screen."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.data.common import IMAGENET, needs_imagenet
from tests.golden import MODELS

from .test_cli import LENET, LENET_WEIGHTS, MNIST_SAMPLE, ROOT

NSFW = MODELS / "open_nsfw"


def _env(tmp_path, **extra) -> dict:
    """The worktree's package first; temporary files in a folder of their own; no log level inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("AMCT_LOG_LEVEL", "AMCT_LOG_FILE_LEVEL")}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmp"), **extra)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def _amct(*args) -> list[str]:
    return [sys.executable, "-m", "amct_caffe", *map(str, args)]


@pytest.mark.slow
@needs_imagenet
@pytest.mark.skipif(not NSFW.is_dir(), reason="../shared/models/open_nsfw not present")
@pytest.mark.parametrize(("sig", "code", "message"), [(signal.SIGINT, 130, "amct-caffe: interrupted"),
                                                       (signal.SIGTERM, 143, "amct-caffe: terminated (SIGTERM)")])
def test_a_signal_during_calibration_cleans_up_and_exits(tmp_path, sig, code, message):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _amct("calibrate", "--model", NSFW / "deploy.prototxt", "--weights", NSFW / "resnet_50_1by2_nsfw.caffemodel",
              "--data", IMAGENET, "--batch-size", "1", "--batch-num", "32", "--resize", "256", "256",
              "--crop", "224", "--mean", "104", "117", "123", "--output", out / "nsfw"),
        cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    try:
        while b"calibration:" not in seen:  # the progress bar: the model is prepared, batches are running
            chunk = proc.stderr.read(1)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        assert os.listdir(tmp_path / "tmp"), "the calibration's temporary directory exists while it runs"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    err = (seen + stderr).decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == message, err
    assert stdout == b""
    assert os.listdir(tmp_path / "tmp") == []  # TemporaryDirectory blocks unwound
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the IFMR worker runs only beside a spare core")
@pytest.mark.parametrize("command", ["calibrate", "retrain"])
def test_ctrl_c_ends_a_run_whose_ifmr_worker_is_running(tmp_path, command):
    """With one BLAS thread on a machine of several cores the IFMR fills go to a worker thread; Ctrl-C then still
    ends the run with status 130 (the exit used to wait for that idle worker forever)."""
    out = tmp_path / "out"
    work = ["--batch-size", "5", "--batch-num", "100"] if command == "calibrate" else ["--select", ":256"]
    proc = subprocess.Popen(
        _amct(command, "--model", LENET, "--weights", LENET_WEIGHTS, "--data", MNIST_SAMPLE / "mnist_500.npz",
              "--scale", "0.00390625", *work, "--output", out / "lenet"),
        cwd=tmp_path, env=_env(tmp_path, OPENBLAS_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    try:
        bar = b"calibration:" if command == "calibrate" else b"retrain"
        while bar not in seen:
            chunk = proc.stderr.read(1)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    err = (seen + stderr).decode()
    assert proc.returncode == 130, err
    assert err.rstrip().splitlines()[-1] == "amct-caffe: interrupted", err
    assert not out.exists() or os.listdir(out) == []


def test_closed_stdout_ends_quietly(tmp_path):
    """`amct-caffe run ... | head -1`: once a BrokenPipeError traceback from print()."""
    with np.load(MNIST_SAMPLE / "mnist_500.npz") as z:  # 5000 lines of results: more than a pipe buffers
        np.savez(tmp_path / "many.npz", data=np.tile(z["images"], (10, 1, 1)))
    proc = subprocess.Popen(_amct("run", "--model", LENET, "--weights", LENET_WEIGHTS, "--input",
                                  tmp_path / "many.npz", "--show", "5000", "--no-progress"),
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away with ~500 lines still to come
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141, err
    assert first.startswith(b"sample 0: top-3")
    assert err == ""


def test_library_info_messages_stay_off_the_screen_unless_asked_for(tmp_path):
    args = ["calibrate", "--model", LENET, "--weights", LENET_WEIGHTS, "--data", MNIST_SAMPLE / "mnist_500.npz",
            "--batch-size", "32", "--scale", "0.00390625", "--output", tmp_path / "out/lenet", "--no-progress"]

    def run(*extra, **env):
        res = subprocess.run(_amct(*args, *extra), cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True,
                             text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[0] == f"fake_quant_model: {tmp_path / 'out/lenet'}_fake_quant_model.prototxt"
        return res.stderr

    assert run() == ""  # the default: only the files written, on stdout
    log_file = tmp_path / "amct_log/amct_caffe.log"
    assert " - INFO - " in log_file.read_text()  # the log file keeps its INFO level
    for err in (run("-v"), run("--verbose"), run(AMCT_LOG_LEVEL="info")):
        assert " - INFO - [AMCT]:[amct_caffe.cli.calibrate]: calibrating on 1 batch(es) of 32" in err
    assert run(AMCT_LOG_LEVEL="ERROR") == ""
    verbose_first = subprocess.run(_amct("-v", *args), cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                                   text=True, timeout=120, check=False)
    assert verbose_first.returncode == 0 and " - INFO - " in verbose_first.stderr


def test_file_names_the_terminal_cannot_encode_are_printed_escaped(tmp_path):
    """PYTHONIOENCODING=ascii and an output named é: the files were written, then print() raised."""
    res = subprocess.run(_amct("calibrate", "--model", LENET, "--weights", LENET_WEIGHTS, "--data",
                               MNIST_SAMPLE / "mnist_500.npz", "--batch-size", "4", "--output", "out/\u00e9t\u00e9",
                               "--no-progress"),
                         cwd=tmp_path, env=_env(tmp_path, PYTHONIOENCODING="ascii"), capture_output=True, timeout=120,
                         check=False)
    assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr
    assert b"deploy_model: out/\\xe9t\\xe9_deploy_model.prototxt" in res.stdout
    assert (tmp_path / "out/\u00e9t\u00e9_deploy_model.prototxt").is_file()


def _calibrate_lenet(out, extra=()):
    return ["calibrate", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--data",
            str(MNIST_SAMPLE / "mnist_500.npz"), "--scale", "0.00390625", "--batch-size", "16", "--batch-num", "2",
            "--no-progress", *extra, "--output", str(out / "lenet")]


# Runs the command with a hook: HOOK's code runs at a chosen moment of the run, then the command goes on.
_HOOKED = r'''
import os, signal, sys, threading
HOOK
from amct_caffe.__main__ import main
sys.argv = ["amct-caffe", *ARGS]
sys.exit(main())
'''


def _before_calibrate(setup: str, body: str) -> str:
    """A hook running ``body`` (lines) as the command's calibration starts, after ``setup`` (module lines)."""
    lines = "".join(f"    {line}\n" for line in body.splitlines())
    return (f"{setup}import amct_caffe.api.workflow as wf\nreal = wf.calibrate\ndef calibrate(*a, **k):\n{lines}"
            "    return real(*a, **k)\nwf.calibrate = calibrate\n"
            "import amct_caffe.cli.calibrate as c; c.calibrate = calibrate\n")


def _hooked(tmp_path, hook: str, args: list[str], **env) -> subprocess.CompletedProcess:
    code = _HOOKED.replace("HOOK", hook).replace("ARGS", repr(args))
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the IFMR worker runs only beside a spare core")
@pytest.mark.parametrize(("sig", "code", "message"), [("SIGINT", 130, "amct-caffe: interrupted"),
                                                       ("SIGTERM", 143, "amct-caffe: terminated (SIGTERM)")])
def test_a_signal_as_the_ifmr_worker_starts_still_ends_the_run(tmp_path, sig, code, message):
    """A signal right after the IFMR worker's thread started (a window in which a ThreadPoolExecutor's worker
    was not yet known to the exit hook, and the exit waited for it for ever)."""
    hook = ("orig = threading.Thread.start\n"
            "def start(self, *a, **k):\n"
            "    orig(self, *a, **k)\n"
            "    if self.name.startswith('amct-ifmr'):\n"
            f"        signal.raise_signal(signal.{sig})\n"
            "threading.Thread.start = start\n")
    out = tmp_path / "out"
    res = _hooked(tmp_path, hook, _calibrate_lenet(out), OPENBLAS_NUM_THREADS="1")
    assert res.returncode == code, res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == message
    assert not out.exists() or os.listdir(out) == []


def test_a_signal_dropped_in_a_finalizer_still_ends_the_command(tmp_path):
    """Python drops an exception raised in a weakref callback, printing 'Exception ignored' and a traceback: a
    Ctrl-C landing there let the run go on to the end with the signals ignored (no second Ctrl-C could stop a
    long run), printing that traceback. It is delivered again after the callback: the run stops there, quietly,
    and nothing is written."""
    hook = _before_calibrate("import weakref\nclass Token: pass\n",
                             "t = Token(); r = weakref.ref(t, lambda _: signal.raise_signal(signal.SIGINT)); del t")
    out = tmp_path / "out"
    res = _hooked(tmp_path, hook, _calibrate_lenet(out))
    assert res.returncode == 130, res.stderr
    assert res.stderr.splitlines() == ["amct-caffe: interrupted"]
    assert not out.exists() or os.listdir(out) == []
    assert os.listdir(tmp_path / "tmp") == []


_LATE = r"""
import signal, sys, time, weakref
import amct_caffe.cli as cli

def _run(args):  # the command's last step runs a finalizer in which the signal lands
    class Token: pass
    t = Token()
    r = weakref.ref(t, lambda _: signal.raise_signal(signal.SIG))
    del t
    return 0
cli._run = _run
code = cli.main(["run", "--model", "m", "--weights", "w", "--input", "i", "--no-progress"])
print("main returned", code, flush=True)
try:
    time.sleep(0.2)
    print("nothing after")
except BaseException as e:
    print("raised after main returned:", type(e).__name__)
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_dropped_as_the_command_returns_is_not_delivered_after_main(tmp_path, sig, code):
    """The command returned while the dropped signal waited to be delivered again: main ended it as interrupted
    and then the late delivery raised in main's error branch (a traceback) or in main's caller."""
    for _ in range(3):
        res = subprocess.run([sys.executable, "-c", _LATE.replace("signal.SIG)", f"signal.{sig})")], cwd=tmp_path,
                             env=_env(tmp_path), capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [f"main returned {code}", "nothing after"], res.stdout
        assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_as_a_temporary_folder_is_removed_leaves_nothing(tmp_path, sig, code):
    """The signal lands as the removal of the run's temporary folder starts (the folder holds the config and
    the intermediate models): that removal stopped there and left the folder in TMPDIR."""
    hook = ("import shutil\n"
            "real = shutil.rmtree\n"
            "def rmtree(path, *a, **k):\n"
            "    if 'amct_calib_' in str(path) and not getattr(rmtree, 'done', False):\n"
            "        rmtree.done = True\n"
            f"        signal.raise_signal(signal.{sig})\n"
            "    return real(path, *a, **k)\n"
            "shutil.rmtree = rmtree\n")
    res = _hooked(tmp_path, hook, _calibrate_lenet(tmp_path / "out"))
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    assert os.listdir(tmp_path / "tmp") == []


def test_ctrl_c_and_sigterm_together_end_as_the_first(tmp_path):
    """Both pending at once: the SIGINT handler's own signal.signal call ran the SIGTERM handler inside it, which
    raised first, so a Ctrl-C followed at once by a SIGTERM reported SIGTERM (143)."""
    hook = _before_calibrate("", "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})\n"
                                 "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM)\n"
                                 "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})")
    out = tmp_path / "out"
    res = _hooked(tmp_path, hook, _calibrate_lenet(out))
    assert res.returncode == 130, res.stderr
    assert res.stderr.splitlines() == ["amct-caffe: interrupted"]


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_after_run_saved_its_file_says_it_is_complete(tmp_path, sig, code):
    """``run --save`` writes its file by itself (not as a set of outputs): an interrupt after it was in place said
    nothing of it."""
    data = tmp_path / "digits.npy"
    np.save(data, (np.load(MNIST_SAMPLE / "mnist_500.npz")["images"][:8, None] / 256).astype(np.float32))
    hook = ("import amct_caffe.cli.run as r\n"
            "real = r._save\n"
            "def _save(*a, **k):\n"
            "    real(*a, **k)\n"
            f"    signal.raise_signal(signal.{sig})\n"
            "r._save = _save\n")
    res = _hooked(tmp_path, hook, ["run", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--input",
                                   str(data), "--save", str(tmp_path / "out.npz"), "--no-progress"])
    assert res.returncode == code, res.stderr
    assert res.stderr.strip().endswith("after the outputs were written (they are complete)"), res.stderr
    assert (tmp_path / "out.npz").exists()


def test_an_interrupt_after_the_outputs_are_written_says_they_are_complete(tmp_path):
    """The summary runs after the outputs are in place: Ctrl-C there leaves them complete, and says so."""
    hook = ("import amct_caffe.cli.calibrate as c\n"
            "def summary(*a, **k):\n"
            "    raise KeyboardInterrupt\n"
            "c._summary = summary\n")
    out = tmp_path / "out"
    res = _hooked(tmp_path, hook, _calibrate_lenet(out))
    assert res.returncode == 130, res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == ("amct-caffe: interrupted after the outputs were written (they "
                                                    "are complete)")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert (out / "lenet_deploy_model.prototxt").exists()


def test_only_the_commands_own_outputs_count_as_written(tmp_path):
    """An interrupt says the outputs are complete only when files under --output / --save were committed: the
    fallback first saves into a temporary folder, which said so while nothing had been written."""
    import argparse

    from amct_caffe.cli import _wrote_outputs
    from amct_caffe.io.outputs import StagedOutputs, commits

    args = argparse.Namespace(output=str(tmp_path / "out/lenet"), save=None)
    mark = commits()
    staged = StagedOutputs()
    staged.add_text(tmp_path / "work/model_fake_quant_model.prototxt", "a temporary save")
    staged.commit()
    assert not _wrote_outputs(args, mark)
    staged = StagedOutputs()  # a folder whose name starts with the prefix's (/tmp/amct_fallback_... for /tmp/a)
    staged.add_text(tmp_path / "out/lenet_work/model_fake_quant_model.prototxt", "another temporary save")
    staged.commit()
    assert not _wrote_outputs(args, mark)
    staged = StagedOutputs()
    staged.add_text(tmp_path / "out/lenet_fake_quant_model.prototxt", "the command's output")
    staged.commit()
    assert _wrote_outputs(args, mark)


# A real signal raised just before or just after a call of the output writing (the hook wraps it) that ``when``
# picks; a Python exception there would stand for a signal only where the signal handler runs at once.
_SIGNAL_AT = ("import os, signal, tempfile, threading\n"
              "real = {target}\n"
              "count = [0]\n"
              "def wrapped(*a, **k):\n"
              "    hit = False\n"
              "    if {when}:\n"
              "        count[0] += 1\n"
              "        hit = count[0] == {nth}\n"
              "    if hit and {before}:\n"
              "        signal.raise_signal(signal.{sig})\n"
              "    result = real(*a, **k)\n"
              "    if hit and not {before}:\n"
              "        signal.raise_signal(signal.{sig})\n"
              "    return result\n"
              "{target} = wrapped\n")


def _create_config(out):
    return ["create-config", "--model", str(LENET), "--weights", str(LENET_WEIGHTS), "--output",
            str(out / "config.json")]


@pytest.mark.parametrize("command, target, when, nth, before, complete", [
    # a file written on its own (create-config's): its temporary file was just made, and must be removed
    (_create_config, "tempfile.mkstemp", "True", 1, False, False),
    # the output writer's thread is about to start: the interrupt must not find it noted but never started
    (_calibrate_lenet, "threading.Thread.start", "a[0].name == 'amct-outputs'", 1, True, False),
    # the first output renamed over the previous run's: the others follow, the previous files go, then the signal
    (_calibrate_lenet, "os.replace", "True", 2, False, True),
])
@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_in_the_output_writing_leaves_old_or_new_files_and_nothing_else(tmp_path, command, target, when,
                                                                                 nth, before, complete, sig, code):
    """Signals landing between the calls that write outputs over a previous run's: found leaving the previous
    files as hidden ``.tmp.previous`` backups (a signal as the renames ended), a hidden ``.tmp`` (one just after
    a temporary file was made) or an internal error (one as the writer thread started)."""
    out = tmp_path / "out"
    first = _hooked(tmp_path, "", command(out))
    assert first.returncode == 0, first.stderr
    before_run = {p.name: p.read_bytes() for p in out.iterdir()}
    for p in out.iterdir():  # the next run's files are told apart from these by their time
        os.utime(p, ns=(0, 0))
    hook = _SIGNAL_AT.format(target=target, when=when, nth=nth, before=before, sig=sig)
    res = _hooked(tmp_path, hook, command(out))
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    assert res.stderr.rstrip().endswith("after the outputs were written (they are complete)") is complete, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(before_run)  # no hidden file, no output missing
    assert all((p.stat().st_mtime_ns != 0) is complete for p in out.iterdir())  # all new, or all as they were
    assert all(p.read_bytes() == before_run[p.name] for p in out.iterdir())  # the same inputs: the same bytes
    assert os.listdir(tmp_path / "tmp") == []
