"""The ``amct-caffe`` command (``python -m amct_caffe``; the console script runs :func:`main`).

Ctrl-C during start-up must not print a traceback: importing the command line takes a noticeable
time (numpy, protobuf, the executor), and a KeyboardInterrupt raised inside an import would
otherwise escape before ``cli.main`` installs its own handling. So this module imports nothing
heavy itself (``amct_caffe/__init__`` is lazy) and wraps the import and the run: an interrupt at
any point ends with cli.main's own line and status, 130.
"""

import os
import signal
import sys

EXIT_SIGINT = 128 + signal.SIGINT


def main() -> int:
    try:
        from amct_caffe.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        # A second Ctrl-C must not cut this line short with a traceback of its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            os.write(2, b"amct-caffe: interrupted\n")  # the line cli.main prints on Ctrl-C
        except OSError:  # stderr closed: nothing more can be said
            pass
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
