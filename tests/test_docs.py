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


def test_config_page_example_cfg_is_valid(tmp_path):
    """The .cfg example of docs/config.md builds a config for the bundled LeNet."""
    import json

    import amct_caffe as amct

    page = (ROOT / "docs/config.md").read_text(encoding="utf-8")
    example = page.split("Example:\n\n```\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "quant.cfg"
    cfg.write_text(example)
    model = ROOT / "samples/mnist/lenet.prototxt"
    weights = ROOT / "samples/mnist/lenet_iter_10000.caffemodel"
    amct.create_quant_config(str(tmp_path / "c.json"), str(model), str(weights), config_defination=str(cfg))
    config = json.loads((tmp_path / "c.json").read_text())
    assert config["batch_num"] == 2 and "ip2" not in config and config["conv1"]["weight_quant_params"]["wts_algo"] \
        == "snq_quantize"
    assert config["ip1"]["weight_quant_params"]["channel_wise"] is False
    assert config["conv2"]["activation_quant_params"]["search_range"] == [0.8, 1.2]


def test_every_picture_and_page_the_docs_link_exists():
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_architecture_page_indexes_every_module():
    """docs/architecture.md's module index names every module of the package (by file name)."""
    package = ROOT / "amct_caffe"
    index = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("## Module index", 1)[1]
    missing = [str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
               if f"`{path.name}`" not in index and path.name != "__init__.py"]
    assert not missing, f"modules missing from docs/architecture.md's module index: {missing}"
