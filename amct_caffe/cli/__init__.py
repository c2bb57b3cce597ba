"""The ``amct-caffe`` command line: one module per command, :func:`main` runs them.

* ``run`` (:mod:`.run`) runs a model in the embedded executor and prints the top classes per sample;
* ``calibrate`` / ``convert`` (:mod:`.calibrate`) quantize a model, calibrating on data or from a
  scale/offset record;
* ``retrain`` (:mod:`.retrain`) quantization-aware training without labels (the INT8 model learns the
  FP32 model's outputs);
* ``compare`` (:mod:`.compare`) writes the accuracy report of a quantized model against its float model;
* ``inspect`` / ``create-config`` (:mod:`.model`) list a model's layers and what quantization does to
  each, and write the quantization config to edit.

:mod:`.options` holds what they share (argument types, file checks, the data options). Every
failure is one line on stderr and exit status 2 (130 on Ctrl-C, 143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import _thread
import threading
import time

from amct_caffe import log
from amct_caffe.cli import calibrate, compare, model, retrain, run
from amct_caffe.errors import AmctError
from amct_caffe.io import outputs, scratch
from amct_caffe.io.paths import reading

_LOG = logging.getLogger(__name__)
EXIT_ERROR, EXIT_SIGPIPE, EXIT_SIGINT, EXIT_SIGTERM = 2, 128 + 13, 128 + 2, 128 + 15


DESCRIPTION = """\
Quantize Caffe models (.prototxt + .caffemodel) to INT8 and see what quantization costs. Models run in
amct_caffe's embedded executor: no Caffe installation is needed.

A typical session (M.prototxt and W.caffemodel: your float model):
  amct-caffe inspect --model M.prototxt --weights W.caffemodel        # the layers, what gets quantized
  amct-caffe calibrate --model M.prototxt --weights W.caffemodel --data images/ --output out/model
  amct-caffe compare --model M.prototxt --weights W.caffemodel --data images/ --output out/report \\
      --quant-model out/model_fake_quant_model.prototxt \\
      --quant-weights out/model_fake_quant_weights.caffemodel         # where accuracy goes
  amct-caffe run --model out/model_fake_quant_model.prototxt \\
      --weights out/model_fake_quant_weights.caffemodel --input images/

'amct-caffe COMMAND --help' describes a command's options (all of them: docs/cli.md).
"""
EPILOG = """\
The screen shows warnings and errors only, unless -v is given or AMCT_LOG_LEVEL is set;
amct_log/amct_caffe.log keeps the INFO messages. Exit status: 0 done, 2 error (one line on stderr),
130 Ctrl-C, 143 SIGTERM.
"""


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are the one line every error is (no usage block before it)."""

    def error(self, message: str):
        self.exit(2, f"amct-caffe: error: {message}; `{self.prog} --help` lists the options\n")


def build_parser() -> argparse.ArgumentParser:
    from amct_caffe import __version__

    parser = _Parser(prog="amct-caffe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbose_help = "show the library's INFO messages on stderr (as AMCT_LOG_LEVEL=INFO)"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # given after the subcommand too; SUPPRESS keeps a subcommand without -v from resetting it
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    # in the order of a session: look at the model, quantize it, see what it cost, run it
    model.add_parsers(sub, common)
    calibrate.add_parser(sub, common)
    retrain.add_parser(sub, common)
    compare.add_parser(sub, common)
    run.add_parser(sub, common)
    return parser


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM. Like KeyboardInterrupt it is no ``Exception``, so no
    ``except Exception`` swallows it, and the ``with`` blocks it unwinds clean up as they do on Ctrl-C
    (temporary directories removed, staged outputs not committed)."""


# The signal on which a signal dropped in a finalizer is delivered again (a real-time one: no tool sends it).
_REDELIVER = getattr(signal, "SIGRTMIN", None)


class _Signals:
    """What :func:`_signals_unwind` yields: ``received``, the signals that came, and :meth:`settle`."""

    def __init__(self):
        self.received: list[int] = []
        self.lock = threading.Lock()
        self.open = True  # False once the command ends: no signal is delivered again after that

    def settle(self) -> None:
        """The command is ending: a signal dropped in a finalizer is not delivered again (the caller now acts
        on ``received``; a late delivery would raise in its error branch, or in its own caller)."""
        with self.lock:
            self.open = False


@contextlib.contextmanager
def _signals_unwind():
    """SIGINT raises KeyboardInterrupt and SIGTERM raises :class:`Terminated` in the main thread.

    After the first of them both are ignored, so that a second Ctrl-C cannot cut the clean-up the
    first one started. A signal the parent process set to be ignored (nohup, ``&`` in a script)
    stays ignored. The previous handlers are restored on exit (``main`` also runs inside tests).

    Yields a :class:`_Signals`. Python drops an exception raised inside a finalizer (``__del__``, a
    weakref callback: tqdm and matplotlib run them), printing its traceback through
    ``sys.unraisablehook``. Ours are not printed: a helper thread delivers the signal again, once the
    hook has returned, on a real-time signal of its own (SIGINT and SIGTERM stay ignored), so that it is
    raised at the main thread's next check after the finalizer (again, if that lands in another one).
    ``main`` ends a command that returns after a signal as interrupted, after :meth:`_Signals.settle`.
    """
    state = _Signals()
    received = state.received
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield state
        return
    raises = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
    previous = {sig: signal.getsignal(sig) for sig in raises}
    armed = [sig for sig in raises if previous[sig] is not signal.SIG_IGN]
    previous_hook = sys.unraisablehook
    previous_redeliver = signal.getsignal(_REDELIVER) if _REDELIVER is not None else None

    def handler(signum, frame):
        if received:  # a second signal run from inside the first one's signal.signal below: the first wins
            return
        received.append(signum)
        for sig in raises:
            signal.signal(sig, signal.SIG_IGN)  # (CPython runs the handlers of pending signals here)
        raise raises[signum]()

    def redelivered(signum, frame):
        with state.lock:
            again = state.open and received
        if again:
            raise raises[received[-1]]()

    def unraisable(info) -> None:
        ours = isinstance(info.exc_value, tuple(raises.values())) and received
        if received and not ours:  # a finalizer of an object the interrupt left half built: noise, not news
            return
        if not ours or threading.current_thread() is not threading.main_thread() or _REDELIVER is None:
            previous_hook(info)
            return
        hook_done = [False]

        def deliver():  # once this hook has returned: raised inside it, it would be dropped too
            while not hook_done[0]:
                time.sleep(0.001)
            with state.lock:
                if state.open:
                    _thread.interrupt_main(_REDELIVER)

        threading.Thread(target=deliver, daemon=True).start()
        hook_done[0] = True  # the last statement: no call between it and the return

    try:
        for sig in armed:
            signal.signal(sig, handler)
        if _REDELIVER is not None:
            signal.signal(_REDELIVER, redelivered)
        sys.unraisablehook = unraisable
        yield state
    finally:
        state.settle()
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        if _REDELIVER is not None:
            signal.signal(_REDELIVER, previous_redeliver if previous_redeliver is not None else signal.SIG_DFL)


def _one_line(text: str, limit: int = 2000) -> str:
    """``text`` with control characters (a newline in a path or a tool's message, a NUL) escaped, cut after
    ``limit`` characters (a message quoting some huge input stays one readable line)."""
    if len(text) > limit:
        text = f"{text[:limit]} ... ({len(text):,} characters in all)"
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def _error(message: str, new_line: bool = False) -> None:
    """The one error line; ``new_line``: start on a fresh line (a signal may have cut a progress bar's
    line in the middle)."""
    with contextlib.suppress(OSError, ValueError):  # stderr closed: nothing more can be said
        print(f"{chr(10) if new_line else ''}amct-caffe: {_one_line(message)}", file=sys.stderr)


def _screen_level(verbose: bool) -> int:
    """WARNING on the screen unless AMCT_LOG_LEVEL says otherwise; -v asks for INFO at least."""
    level = log.level_from_env("AMCT_LOG_LEVEL", default=logging.WARNING)
    return min(level, logging.INFO) if verbose else level


# The options that name files or folders a command reads.
INPUT_ARGS = ("model", "weights", "input", "data", "preprocess", "config", "cfg", "record", "quant_model",
              "quant_weights")


def _run(args) -> int:
    for name, value in vars(args).items():  # argv cannot hold NUL, but main(argv) from Python can
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and "\0" in item:
                raise AmctError(f"--{name.replace('_', '-')} {item!r}: contains a NUL character")
    log.setup(force=True, screen_level=_screen_level(args.verbose))
    # A file name the terminal's encoding cannot show (é on an ASCII terminal, undecodable bytes) is
    # printed escaped rather than failing after the files were written (stderr already does this).
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")
    inputs = {f"--{name.replace('_', '-')}": getattr(args, name) for name in INPUT_ARGS
              if isinstance(getattr(args, name, None), str)}
    with reading(**inputs):  # every output the command writes is checked against these (io/paths.py)
        return args.func(args)


def _wrote_outputs(args, mark: int) -> bool:
    """Whether files under the command's --output (a prefix or a folder) or --save were committed since ``mark``
    (not the temporary files some commands commit on the way)."""
    targets = [os.path.abspath(p) for p in (getattr(args, "output", None), getattr(args, "save", None))
               if isinstance(p, str)]

    def under(path: str, target: str) -> bool:  # the file itself, a file in the folder, or prefix + suffix
        folder, prefix = os.path.split(target)
        return path == target or path.startswith(target + os.sep) or (
            os.path.dirname(path) == folder and os.path.basename(path).startswith(prefix + "_"))
    return any(under(path, target) for path in outputs.committed_since(mark) for target in targets)


def main(argv=None) -> int:
    """Run the command; every failure is one line on stderr and exit status 2 (130 on Ctrl-C,
    143 on SIGTERM, 141 when stdout is closed early, as by ``| head``)."""
    args = build_parser().parse_args(argv)
    committed = outputs.commits()
    with _signals_unwind() as signals:
        try:
            try:
                code = _run(args)
            finally:
                signals.settle()  # before any branch below runs: no late delivery inside them
            if signals.received:  # the signal's exception was dropped in a finalizer: end as it asked
                raise (KeyboardInterrupt if signals.received[0] == signal.SIGINT else Terminated)()
            return code
        except AmctError as e:
            _LOG.debug("the error's traceback", exc_info=True)
            _error(f"error: {e}")
            return EXIT_ERROR
        except (KeyboardInterrupt, Terminated) as e:
            signals.settle()
            scratch.remove_leftovers()  # a temporary folder whose removal the signal cut
            # after the command's outputs were committed they are all in place (a summary or a clean-up was left)
            after = " after the outputs were written (they are complete)" if _wrote_outputs(args, committed) else ""
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
            _error(what + after, new_line=getattr(args, "progress", False))
            return EXIT_SIGINT if isinstance(e, KeyboardInterrupt) else EXIT_SIGTERM
        except BrokenPipeError:
            # The reader of stdout is gone (e.g. `| head`): stop quietly, as a pipeline expects, and keep
            # the interpreter's final flush from complaining about the closed pipe.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_SIGPIPE
        except MemoryError as e:
            _LOG.debug("out of memory", exc_info=True)
            _error(f"error: out of memory{f' ({e})' if str(e) else ''}: use a smaller --batch-size, "
                   "or fewer / smaller inputs")
            return EXIT_ERROR
        except OSError as e:  # the system refused (disk full, permissions...): not a bug, say what failed
            _LOG.debug("the error's traceback", exc_info=True)
            _error(f"error: {e}")
            return EXIT_ERROR
        except Exception as e:  # a bug: one line, the traceback in the DEBUG log
            _LOG.debug("internal error", exc_info=True)
            _error(f"internal error: {type(e).__name__}: {e} -- please report it; run with "
                   "AMCT_LOG_LEVEL=DEBUG for the traceback")
            return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
