"""The amct-caffe parser: --version, a description for every command, docs/cli.md naming every flag."""

import argparse
import re
from pathlib import Path

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
    assert list(commands) == ["inspect", "create-config", "calibrate", "convert", "retrain", "compare", "run"]
    for name, sub in commands.items():
        assert sub.description and len(sub.description) > 40, name
        assert "``" not in sub.description, name
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
    assert set(helps) == set(commands) and all(helps.values())


DOC = Path(__file__).resolve().parents[1] / "docs/cli.md"
SHARED = {"-h", "--help", "-v", "--verbose"}  # documented once, in "What every command shares"


def _sections() -> dict[str, str]:
    """docs/cli.md by '## ' heading (the text before the first one under '')."""
    out, title = {"": ""}, ""
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            out[title] = ""
        out[title] += line + "\n"
    return out


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _table_flags(section: str) -> set[str]:
    """The flags named in the first cell of the section's table rows."""
    return {flag for line in section.splitlines() if line.startswith("| `")
            for flag in re.findall(r"`(-[-\w]+)`", line.split("|")[1])}


def test_docs_cli_md_documents_every_flag_in_its_commands_section():
    parser = cli.build_parser()
    sections = _sections()
    shared = sections["What every command shares"]
    for flag in _flags(parser):
        assert f"`{flag}`" in shared, f"docs/cli.md: {flag} (amct-caffe {flag}) is not documented"
    for name, sub in _subcommands(parser).items():
        section = sections.get(f"amct-caffe {name}")
        assert section is not None, f"docs/cli.md has no section '## amct-caffe {name}'"
        missing = sorted(f for f in _flags(sub) - SHARED if f"`{f}`" not in section)
        assert not missing, f"docs/cli.md, amct-caffe {name}: {missing} not documented"
        unknown = sorted(_table_flags(section) - _flags(sub))
        assert not unknown, f"docs/cli.md, amct-caffe {name}: documents {unknown}, which it does not take"
    for name in ("calibrate", "compare", "run"):
        assert _table_flags(sections["Data options (calibrate, compare, run)"]) <= _flags(_subcommands(parser)[name])


def test_readme_links_the_command_line_reference():
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "(docs/cli.md)" in readme
