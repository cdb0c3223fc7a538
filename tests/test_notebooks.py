"""The walkthrough notebooks: each one is committed with its outputs, calls its script's own functions,
and still executes top to bottom (from an empty checkpoint folder, set by conftest.py)."""

import json
from pathlib import Path

import pytest

from common.reproduce import execute_notebook

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("ram", "forcing_kv", "lfm_stability", "attention_sinks", "time_blind_fm")
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_each_notebook_belongs_to_a_script():
    assert NOTEBOOKS, "no notebooks in notebooks/"
    assert {p.stem for p in NOTEBOOKS} <= set(SCRIPTS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_read_without_running(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    sources = "".join("".join(c["source"]) for c in code)
    assert f"import {path.stem}" in sources, "a walkthrough calls its script's functions, never a copy"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in code), "every code cell was executed before committing"
    assert not [o for o in outputs if o["output_type"] == "error"], "a stored output is an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), "no stored picture"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_top_to_bottom(path):
    # raises CellExecutionError (with the failing cell) on any error; the committed file is not touched
    execute_notebook(path, timeout=300, write=False)
