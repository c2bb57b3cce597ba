"""The documentation generated from the code is the code's: docs/layers.md cannot drift from the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_layer_table", ROOT / "docs/generate_layer_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_table_page_is_what_the_registry_says():
    committed = (ROOT / "docs/layers.md").read_text(encoding="utf-8")
    assert committed == _generator().table(), "docs/layers.md is stale: run python docs/generate_layer_table.py"


def test_layer_table_lists_every_type_of_the_guide_and_of_the_executor():
    from amct_caffe import ops
    from amct_caffe.runtime import known_types

    page = (ROOT / "docs/layers.md").read_text(encoding="utf-8")
    listed = {line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(ops.quantizable_types()) | set(known_types()) <= listed
