"""io/scratch.signals_deferred: SIGINT / SIGTERM held across a few statements and delivered after them, all of
them, with every handler back in place; and the temporary files made under it leave no descriptor open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def test_a_sigterm_held_after_a_sigint_still_ends_the_process():
    """The replay stopped at the first handler that raised (KeyboardInterrupt): the SIGTERM held after it was lost
    and a script catching KeyboardInterrupt went on running."""
    res = _run("import os, signal, time\n"
               "from amct_caffe.io.scratch import signals_deferred\n"
               "try:\n"
               "    with signals_deferred():\n"
               "        os.kill(os.getpid(), signal.SIGINT)\n"
               "        os.kill(os.getpid(), signal.SIGTERM)\n"
               "except KeyboardInterrupt:\n"
               "    pass\n"
               "time.sleep(0.5)\n"
               "print('still running')\n")
    assert res.returncode == -signal.SIGTERM and "still running" not in res.stdout, (res.returncode, res.stdout)


def test_a_signal_run_while_the_handlers_are_put_back_leaves_none_of_ours_installed():
    """signal.signal runs the handlers of pending signals: a SIGINT landing as SIGINT's handler was back raised
    from the next restore, leaving SIGTERM on the block's recording function for good."""
    res = _run("import os, signal\n"
               "from amct_caffe.io.scratch import signals_deferred\n"
               "real, armed = signal.signal, [True]\n"
               "def wrapped(sig, handler):\n"
               "    old = real(sig, handler)\n"
               "    if armed[0] and sig == signal.SIGINT and handler is signal.default_int_handler:\n"
               "        armed[0] = False\n"
               "        os.kill(os.getpid(), signal.SIGINT)\n"
               "    return old\n"
               "signal.signal = wrapped\n"
               "try:\n"
               "    with signals_deferred():\n"
               "        pass\n"
               "except KeyboardInterrupt:\n"
               "    print('interrupted')\n"
               "signal.signal = real\n"
               "print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n")
    assert res.stdout.split() == ["interrupted", "True"], (res.stdout, res.stderr[-1000:])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_a_signal_held_while_a_temporary_output_is_made_leaves_no_descriptor_open(tmp_path):
    res = _run("import os, signal, tempfile\n"
               "import amct_caffe.io.files as files, amct_caffe.io.outputs as outputs\n"
               f"d = {str(tmp_path)!r}\n"
               "real = files.temp_file_beside\n"
               "def made(path):\n"
               "    r = real(path)\n"
               "    os.kill(os.getpid(), signal.SIGINT)\n"
               "    return r\n"
               "files.temp_file_beside = outputs.temp_file_beside = made\n"
               "count = lambda: len(os.listdir('/proc/self/fd'))\n"
               "before = count()\n"
               "for i in range(10):\n"
               "    try:\n"
               "        with files.atomic_output(os.path.join(d, 'a.bin')) as f:\n"
               "            f.write(b'x')\n"
               "    except KeyboardInterrupt:\n"
               "        pass\n"
               "    try:\n"
               "        with outputs.StagedOutputs() as out:\n"
               "            out.add_bytes(os.path.join(d, 'b.bin'), b'x')\n"
               "            out.commit()\n"
               "    except KeyboardInterrupt:\n"
               "        pass\n"
               "print(count() - before, sorted(os.listdir(d)))\n")
    assert res.stdout.strip() == "0 []", (res.stdout, res.stderr[-1000:])
