"""The README's node tables stay true to the node schemas.

Each ``### Display name (`node_id`)`` section of README "Nodes" has a table whose first column names
inputs (``a / b`` for two) and whose second column gives the default. Against the schema snapshot
``tests/data/object_info.json`` (itself compared with a live server in the host tier): every widget
input of a documented node is in its table, every input the table names exists, and every default
the table gives is the schema's. Defaults are written as in the UI: ``on``/``off`` for booleans,
``""`` for an empty text, a blank cell for a text with no default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
OBJECT_INFO = REPO / "tests" / "data" / "object_info.json"
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
HEADING = re.compile(r"^### .+ \(`(FateZero_\w+)`\)\s*$")


def node_tables(text: str) -> dict[str, dict[str, str]]:
    """``node_id -> {input name: default cell}`` from the README's node sections."""
    section = text.split("## Nodes", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, dict[str, str]] = {}
    node = None
    for line in section.splitlines():
        match = HEADING.match(line)
        if match:
            node = match.group(1)
            tables[node] = {}
            continue
        if node is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] == "input" or set(cells[0]) <= {"-"}:
            continue
        for name in cells[0].split(" / "):
            tables[node][name.strip()] = cells[1]
    return tables


def schema_inputs() -> dict[str, dict[str, dict]]:
    nodes = json.loads(OBJECT_INFO.read_text())["nodes"]
    return {node_id: {i["name"]: i for i in info["inputs"]}
            for node_id, info in nodes.items() if node_id.startswith("FateZero_")}


def is_widget(spec: dict) -> bool:
    kind = spec["type"]
    return (kind if isinstance(kind, str) else "COMBO") in WIDGETS


def matches(cell: str, spec: dict) -> bool:
    """Does the README's default cell say the schema's default? Sockets have none to compare."""
    if not is_widget(spec):
        return True
    default = spec.get("default")
    if cell == "":
        return default in (None, "") and spec["type"] in ("STRING", "COMBO") or not isinstance(spec["type"], str)
    if spec["type"] == "BOOLEAN":
        return {"on": True, "off": False}.get(cell) is default
    if spec["type"] in ("INT", "FLOAT"):
        try:
            return float(cell) == float(default)
        except (TypeError, ValueError):
            return False
    if cell == '""':
        return default == ""
    return cell == str(default)


TABLES = node_tables(README.read_text())
SCHEMAS = schema_inputs()


def test_every_pack_node_has_a_readme_section():
    headings = set(re.findall(r"^### .+ \(`(FateZero_\w+)`\)", README.read_text(), re.M))
    assert headings == set(SCHEMAS)


@pytest.mark.parametrize("node_id", sorted(TABLES))
def test_table_lists_every_widget_and_only_real_inputs(node_id):
    schema = SCHEMAS[node_id]
    assert set(TABLES[node_id]) <= set(schema), set(TABLES[node_id]) - set(schema)
    widgets = {name for name, spec in schema.items() if is_widget(spec)}
    assert widgets <= set(TABLES[node_id]), f"not in the README table: {sorted(widgets - set(TABLES[node_id]))}"


@pytest.mark.parametrize("node_id", sorted(TABLES))
def test_table_defaults_are_the_schema_defaults(node_id):
    wrong = [f"{name}: README {cell!r}, schema {SCHEMAS[node_id][name].get('default')!r}"
             for name, cell in TABLES[node_id].items()
             if name in SCHEMAS[node_id] and not matches(cell, SCHEMAS[node_id][name])]
    assert not wrong, wrong


SAMPLE = """# pack

## Nodes

### First Node (`FateZero_First`)

| input | default | what it does |
|---|---|---|
| steps | 50 | DDIM steps |
| width / height | 512 | frame size |
| source_prompt | | the prompt |

### Second Node (`FateZero_Second`)
| input | default | what it does |
| --- | --- | --- |
| enabled | on | switch |

## Benchmarks

### Not a node (`FateZero_Third`)
| steps | 7 | |
"""


def test_parser_reads_a_readme_like_text():
    assert node_tables(SAMPLE) == {
        "FateZero_First": {"steps": "50", "width": "512", "height": "512", "source_prompt": ""},
        "FateZero_Second": {"enabled": "on"},
    }


@pytest.mark.parametrize("cell, spec, expected", [
    ("50", {"type": "INT", "default": 50}, True),
    ("20", {"type": "INT", "default": 50}, False),
    ("0.8", {"type": "FLOAT", "default": 0.8}, True),
    ("on", {"type": "BOOLEAN", "default": True}, True),
    ("off", {"type": "BOOLEAN", "default": True}, False),
    ("", {"type": "STRING"}, True),
    ('""', {"type": "STRING", "default": ""}, True),
    ("auto", {"type": ["auto", "replace"], "default": "auto"}, True),
    ("replace", {"type": ["auto", "replace"], "default": "auto"}, False),
    ("anything", {"type": "MODEL"}, True),
])
def test_default_cells_compare_as_the_ui_shows_them(cell, spec, expected):
    assert matches(cell, spec) is expected


def test_torch_versions_named_are_the_ci_pin_or_recorded_by_a_run():
    """A torch version in the README is the one CI installs or one a benchmark run recorded."""
    recorded = {version.split("+")[0]
                for path in (REPO / "benchmarks" / "results").glob("*.json")
                for version in re.findall(r'"torch": "([^"]+)"', path.read_text())}
    pin = re.search(r"torch==([\d.]+)", (REPO / ".ci" / "run").read_text()).group(1)
    named = set(re.findall(r"torch(?: |==)(\d+\.\d+(?:\.\d+)?)", README.read_text()))
    assert named and named <= recorded | {pin}, sorted(named - recorded - {pin})


def test_every_benchmark_script_is_in_the_readme_with_its_results():
    """Each script of ``benchmarks/`` (helpers start with ``_``) is run in README "Benchmarks" and has
    its committed ``benchmarks/results/<name>.json``, so a new benchmark comes with its targets."""
    section = README.read_text().split("\n## Benchmarks", 1)[1].split("\n## ", 1)[0]
    scripts = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert scripts
    unlisted = [p.name for p in scripts if f"benchmarks/{p.name}" not in section]
    no_results = [p.name for p in scripts if not (REPO / "benchmarks" / "results" / f"{p.stem}.json").exists()]
    assert not unlisted, unlisted
    assert not no_results, no_results
