"""The amct-caffe parser: --version, a description for every command, docs/cli.md naming every flag."""

import argparse

import pytest

import amct_caffe
from amct_caffe import cli


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"amct-caffe {amct_caffe.__version__}\n"


def test_every_command_has_a_description_and_a_help_line():
    parser = cli.build_parser()
    assert "Quantize Caffe models" in parser.description and "``" not in parser.description
    commands = _subcommands(parser)
    assert list(commands) == ["inspect", "create-config", "calibrate", "convert", "compare", "run"]
    for name, sub in commands.items():
        assert sub.description and len(sub.description) > 40, name
        assert "``" not in sub.description, name
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
    assert set(helps) == set(commands) and all(helps.values())
