"""The command line on random networks (netgen's): inspect, create-config and run (with --save) either
finish or stop with the library's one-line error, never an internal error.

It found ``run`` reshaping a scalar output into one row per sample. ``AMCT_CLI_NETS`` sets the number
of nets (default 100; about 10 s).
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

from amct_caffe import cli
from tests.differential.test_ptq_random import _batches, random_models

NETS = int(os.environ.get("AMCT_CLI_NETS", "100"))
SEED = 5


def _main(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


@pytest.mark.usefixtures("cli_scratch_dir")
def test_commands_on_random_networks(tmp_path):
    finished = 0
    for index, gen, work, proto, weights in random_models(SEED, NETS, tmp_path):
        # arrays hold samples first; a recurrent layer's cont input is time-major in the net
        feed = _batches(gen.inputs, index)[0]
        np.savez(work / "x.npz", **{k: np.moveaxis(v, 1, 0) if k.startswith("cont") else v for k, v in feed.items()})
        model = ["--model", str(proto), "--weights", str(weights)]
        for args in (["inspect", *model], ["create-config", *model, "--output", str(work / "c.json")],
                     ["run", *model, "--input", str(work / "x.npz"), "--save", str(work / "o.npz"), "--no-progress"]):
            code, err = _main(args)
            where = f"net ({SEED}, {index}) focused on {gen.focus}: amct-caffe {args[0]}"
            assert "internal error" not in err and "Traceback" not in err, f"{where}: {err[-500:]}"
            assert code in (0, 2), f"{where}: exit status {code}"
            finished += code == 0
    assert finished > NETS, finished  # most nets ran all three commands
