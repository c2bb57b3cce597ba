"""Ctrl-C while ``amct-caffe`` starts (its imports, before cli.main runs) ends quietly with status 130.

A ``sitecustomize`` put first on the path installs an import hook that, when the named module is
about to be imported, sends the process a real SIGINT and waits for it: Python's default handler
raises KeyboardInterrupt inside that import, as when the user presses Ctrl-C at that moment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from .test_cli import ROOT

HOOK = '''
import os, signal, sys, time
TARGET = os.environ["AMCT_TEST_SIGINT_ON_IMPORT"]

class _Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == TARGET:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the KeyboardInterrupt comes here
        return None

sys.meta_path.insert(0, _Interrupt())
'''


def _console_script() -> list[str]:
    """The console script as pip writes it: import the entry point's object and exit with its result."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["amct-caffe"]
    module, func = entry.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def _run(tmp_path, command: list[str], target: str, hook: str = HOOK,
         args=("inspect", "--help")) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(hook)
    env = {k: v for k, v in os.environ.items() if k not in ("AMCT_LOG_LEVEL", "AMCT_LOG_FILE_LEVEL")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), AMCT_TEST_SIGINT_ON_IMPORT=target)
    return subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


# What the command imports before cli.main runs: the command line's package, the standard library's
# argparse, the library's errors, a command's module, numpy (imported deep inside one of them).
TARGETS = ["amct_caffe.cli", "argparse", "amct_caffe.errors", "amct_caffe.cli.calibrate", "numpy"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("how", ["python -m amct_caffe", "console script"])
def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path, target, how):
    command = [sys.executable, "-m", "amct_caffe"] if how == "python -m amct_caffe" else _console_script()
    res = _run(tmp_path, command, target)
    assert res.returncode == 130, res.stderr
    assert res.stderr == "amct-caffe: interrupted\n"
    assert res.stdout == ""


def test_the_hook_really_interrupts(tmp_path):
    """Without the command's handling the same hook gives Python's traceback (the test can fail)."""
    res = _run(tmp_path, [sys.executable, "-c", "import amct_caffe.cli"], "numpy")
    assert res.returncode != 0 and "KeyboardInterrupt" in res.stderr and "Traceback" in res.stderr


def test_without_an_interrupt_the_command_starts(tmp_path):
    res = _run(tmp_path, _console_script(), "a.module.nobody.imports")
    assert res.returncode == 0, res.stderr
    assert "usage: amct-caffe inspect" in res.stdout


# The KeyboardInterrupt raised inside code run by exec(), as when Ctrl-C lands while a dataclass or a
# namedtuple builds its methods: CPython then ends a process whose code caught the interrupt by re-raising
# SIGINT at exit (status -2), unless the command leaves by os._exit (amct_caffe/__main__.py).
HOOK_IN_EXEC = HOOK.replace(
    "            os.kill(os.getpid(), signal.SIGINT)\n            time.sleep(30)  # the KeyboardInterrupt comes here",
    '            exec("os.kill(os.getpid(), signal.SIGINT); time.sleep(30)",\n'
    '                 {"os": os, "signal": signal, "time": time})')


@pytest.mark.parametrize("target", ["amct_caffe.cli.calibrate", "amct_caffe.api.model_info"])  # start-up / running
@pytest.mark.parametrize("how", ["python -m amct_caffe", "console script"])
def test_ctrl_c_inside_exec_code_still_exits_130(tmp_path, target, how):
    command = [sys.executable, "-m", "amct_caffe"] if how == "python -m amct_caffe" else _console_script()
    res = _run(tmp_path, command, target, HOOK_IN_EXEC, ("inspect", "--model", ROOT / "samples/mnist/lenet.prototxt"))
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip() == "amct-caffe: interrupted"
    assert res.stdout == ""


HOOK_TERM = HOOK.replace("os.kill(os.getpid(), signal.SIGINT)", "os.kill(os.getpid(), signal.SIGTERM)")


@pytest.mark.parametrize("target", ["amct_caffe.cli", "argparse", "numpy"])
def test_sigterm_during_start_up_exits_143_with_one_line(tmp_path, target):
    """SIGTERM while the command line is imported (before cli.main handles it) killed the process with no word
    (status -15); it now ends as a SIGTERM during the run does."""
    res = _run(tmp_path, [sys.executable, "-m", "amct_caffe"], target, HOOK_TERM)
    assert res.returncode == 143, res.stderr
    assert res.stderr == "amct-caffe: terminated (SIGTERM)\n"
    assert res.stdout == ""
