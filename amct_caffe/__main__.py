"""The ``amct-caffe`` command (``python -m amct_caffe``; the console script runs :func:`main`).

Ctrl-C during start-up must not print a traceback: importing the command line takes a noticeable
time (numpy, protobuf, the executor), and a KeyboardInterrupt raised inside an import would
otherwise escape before ``cli.main`` installs its own handling. So this module imports nothing
heavy itself (``amct_caffe/__init__`` is lazy) and wraps the import and the run: an interrupt from the
moment this module runs ends with cli.main's own line and status, 130 (143 for SIGTERM, handled here until
cli.main takes over); once the command is done, signals are ignored while the interpreter shuts down.
(Before Python has started this module, its own defaults apply.)

That status is then given by ``os._exit`` (:func:`_exit_interrupted`), not by returning: CPython 3.11
marks a KeyboardInterrupt raised inside code run by ``exec()`` or ``eval()`` as unhandled even when it
is caught, and then ends the process at exit by re-raising SIGINT (status -2, not 130). Such code runs
whenever a module defining a dataclass or a namedtuple is imported, as the command's modules are, lazily,
while it works: a Ctrl-C there used to end with -2 about once in ten.
"""

import atexit
import contextlib
import os
import signal
import sys
import threading

EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class _TerminatedEarly(BaseException):
    """SIGTERM before cli.main handles it (while the command line is imported)."""


def _terminated_early(signum, frame):
    raise _TerminatedEarly()


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, signal.SIG_IGN)


def main() -> int:
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # (a parent's "ignore" stays)
        signal.signal(signal.SIGTERM, _terminated_early)
    try:
        from amct_caffe.cli import main as cli_main

        code = cli_main()
        _ignore_signals()  # the command is done: a signal during the interpreter's shutdown changes nothing
    except (KeyboardInterrupt, _TerminatedEarly) as e:
        # A second signal must not cut this line short with a traceback of its own.
        _ignore_signals()
        early = isinstance(e, _TerminatedEarly)
        try:  # the line cli.main prints
            os.write(2, b"amct-caffe: terminated (SIGTERM)\n" if early else b"amct-caffe: interrupted\n")
        except OSError:  # stderr closed: nothing more can be said
            pass
        code = EXIT_SIGTERM if early else EXIT_SIGINT
    if code in (EXIT_SIGINT, EXIT_SIGTERM):
        _exit_interrupted(code)
    return code


def _exit_interrupted(code: int = EXIT_SIGINT):
    """End the process with status 130 after what interpreter shutdown does first (module doc): wait for
    the threads that are not daemons (a file being written finishes or removes its temporary file), run
    the ``atexit`` handlers (logging's flush, the finalizers of temporary directories), flush stdio.

    The threads are waited for as the interpreter waits for them, through ``threading._shutdown``: it first
    runs the exit hooks of ``threading._register_atexit``, which tell a ``ThreadPoolExecutor``'s idle workers
    to stop; joining those threads without them waited forever. (The IFMR worker of
    runtime/layers/calibration_overlap.py is a daemon: nothing waits for it.)"""
    _ignore_signals()  # the clean-up below is not to be cut short either
    threading._shutdown()  # noqa: SLF001 - (every supported Python, 3.10 on, has it)
    atexit._run_exitfuncs()  # noqa: SLF001 - the interpreter's own exit step, run before os._exit skips it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # (143 as well: a daemon thread still inside C++, the IFMR worker, is not torn down with its thread pool)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
