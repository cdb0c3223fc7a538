"""The README quotes a real run: every number in its results tables is in assets/summary.json.

assets/summary.json is the summary that `python -m common.reproduce --preset cpu` wrote for the run
the README quotes. Checked here: the front table (runtime and headline columns), the base model's
table, and the "ours" column of every paper section's "paper vs ours" table. The rounding rule
(also stated in the README): a number shown with n decimals matches a stored value v when
|v - shown| <= 0.5 * 10^-n; a percentage matches 100 v the same way; thousands separators and the
signs + and − (U+2212) are read as usual. A number is looked up only in its own script's runs (cold,
warm and benchmark) and configs, not in the long curves (lists of more than LONG values).
"""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUMMARY = REPO / "assets" / "summary.json"
LONG = 12  # lists longer than this are curves for figures; tables quote scalars
NUMBER = re.compile(r"(?<![\w.])([+\-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:e([+\-−]?\d+))?(\s?%)?")
SCRIPTS = ("ram", "forcing_kv", "lfm_stability", "attention_sinks", "time_blind_fm")


def numbers_in(text: str) -> list:
    """Quoted numbers in a table cell -> [(value, decimals, is_percent, as_written)]. Text in backticks
    (commands, code names such as `fig_1.png`) and arXiv ids are not numbers we measured."""
    text = re.sub(r"`[^`]*`|arXiv \S+", " ", text)
    found = []
    for m in NUMBER.finditer(text):
        sign, whole, frac, exp, pct = m.groups()
        value = float(whole.replace(",", "") + (frac or ""))
        decimals = len(frac) - 1 if frac else 0
        if exp:
            value, decimals = value * 10 ** int(exp.replace("−", "-")), max(0, decimals - int(exp.replace("−", "-")))
        found.append((-value if sign in "-−" and sign else value, decimals, bool(pct), m.group(0).strip()))
    return found


def pool(obj, out=None) -> list:
    """Every number stored in a run record: numeric leaves, numeric dict keys, and numbers inside short
    strings such as "16,32,64"; lists longer than LONG are skipped."""
    out = [] if out is None else out
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, str) and len(obj) < 40:
        out += [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", obj)]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            pool(k, out)
            pool(v, out)
    elif isinstance(obj, list) and len(obj) <= LONG:
        for v in obj:
            pool(v, out)
    return out


def matches(value: float, decimals: int, percent: bool, stored: list) -> bool:
    tol = 0.5 * 10 ** -decimals + 1e-9
    return any(abs((100 * v if percent else v) - value) <= tol for v in stored)


def tables(markdown: str):
    """-> [(section heading, header cells, rows of cells)] for every pipe table."""
    section, out, current = "", [], None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = (section, cells, [])
                out.append(current)
            elif not all(set(c) <= set("-: ") for c in cells):
                current[2].append(cells)
        else:
            current = None
    return out


def script_of(text: str):
    return next((s for s in SCRIPTS if f"`{s}.py`" in text), None)


def quoted_cells(markdown: str):
    """-> [(script, where, cell text)] for every cell the README quotes from a run."""
    cells = []
    for section, header, rows in tables(markdown):
        if section.startswith("The five scripts"):  # the front table: one row per script
            cols = [i for i, h in enumerate(header) if h.startswith("CPU") or h.startswith("headline")]
            for row in rows:
                cells += [(script_of(row[0]), f"front table, {row[0]}", row[i]) for i in cols]
        elif section.startswith("The base model"):
            cols = [i for i, h in enumerate(header) if "cpu" in h]
            cells += [("pretrain", f"base model, {row[0]}", row[i]) for row in rows for i in cols]
        elif script_of(section) and len(header) > 2 and header[1].startswith("paper"):
            cols = [i for i, h in enumerate(header) if h.startswith("ours")]
            cells += [(script_of(section), f"{section.split(' — ')[0]}, {row[0]}", row[i]) for row in rows
                      for i in cols]
    return cells


def stored_numbers(summary: dict, script: str) -> list:
    runs = {k: v for k, v in summary["runs"].items() if k == script or k.startswith(script + "_")}
    return pool(runs)


def test_rounding_rule_and_number_parsing():
    assert [n[:3] for n in numbers_in("**0.41×** at 16 px, −0.49, 1,006 s, 14.3%, +0.110 [0.091, 0.131]")] == [
        (0.41, 2, False), (16, 0, False), (-0.49, 2, False), (1006, 0, False), (14.3, 1, True), (0.11, 3, False),
        (0.091, 3, False), (0.131, 3, False)]
    assert numbers_in("`fig_2.png` (arXiv 2605.10759)") == []
    assert matches(0.747, 2, False, [0.7468]) and not matches(0.76, 2, False, [0.7468])
    assert matches(14.3, 1, True, [0.1432]) and not matches(14.3, 1, False, [0.1432])
    assert pool({"a": [1.5] * (LONG + 1), "b": {"16": "1,2"}, "c": True}) == [16.0, 1.0, 2.0]


def test_every_quoted_number_is_in_the_summary_of_the_quoted_run():
    summary = json.loads(SUMMARY.read_text())
    cells = quoted_cells((REPO / "README.md").read_text())
    assert {s for s, _, _ in cells} >= {"pretrain", *SCRIPTS}, "a results table went missing from the README"
    missing = []
    for script, where, text in cells:
        stored = stored_numbers(summary, script)
        missing += [f"{where}: {w}" for v, d, pct, w in numbers_in(text) if not matches(v, d, pct, stored)]
    assert not missing, "README numbers not in assets/summary.json:\n" + "\n".join(missing)


def test_summary_is_the_cpu_run_and_every_step_passed():
    summary = json.loads(SUMMARY.read_text())
    assert summary["preset"] == "cpu"
    assert all(r["status"] == "ok" for r in summary["runs"].values())


@pytest.fixture(scope="module")
def smoke_summary(tmp_path_factory):
    from common import reproduce

    return reproduce.main(["--preset", "smoke", "--out", str(tmp_path_factory.mktemp("reproduce"))])


def test_smoke_reproduce_has_the_keys_of_the_quoted_summary(smoke_summary):
    from common.reproduce import summary_keys

    assert all(r["status"] == "ok" for r in smoke_summary["runs"].values()), smoke_summary["runs"]
    assert summary_keys(smoke_summary) == summary_keys(json.loads(SUMMARY.read_text()))


def test_every_figure_shown_exists_and_every_figure_in_assets_is_shown():
    readme = (REPO / "README.md").read_text()
    shown = set(re.findall(r"\]\((assets/[^)]+\.png)\)", readme))
    present = {str(p.relative_to(REPO)) for p in (REPO / "assets").rglob("*.png")}
    assert not shown - present, f"shown but missing: {sorted(shown - present)}"
    assert not present - shown, f"in assets/ but never shown: {sorted(present - shown)}"


def test_a_number_edited_by_hand_is_caught():
    """Change the first quoted number of each script's cells by two units of its last decimal: the
    check must report it (so the test above can fail)."""
    summary = json.loads(SUMMARY.read_text())
    seen = set()
    for script, _, text in quoted_cells((REPO / "README.md").read_text()):
        found = numbers_in(text)
        if script in seen or not found:
            continue
        value, decimals, pct, _ = found[0]
        edited = value + 2 * 10 ** -decimals
        stored = stored_numbers(summary, script)
        if not matches(edited, decimals, pct, stored):  # a neighbouring stored value could match by chance
            seen.add(script)
    assert seen >= {"pretrain", *SCRIPTS}, f"edits not caught for {sorted({'pretrain', *SCRIPTS} - seen)}"
