"""The README and the pages in docs/ quote a real run: every number in their results tables is in
assets/summary.json, every figure they show exists, and every relative link resolves.

assets/summary.json is the summary that `python -m common.reproduce --preset cpu` wrote for the run
the pages quote. Which cells are checked: on every page, the columns of a table whose header starts
with "ours", "here" or "CPU", or names the `cpu` preset. A page in docs/ named after a script
(docs/ram.md) quotes that script's runs; docs/base_model.md quotes the base model (`pretrain`); on
the README, each row quotes the script its first cell names. The rounding rule: a number shown with
n decimals matches a stored value v when |v - shown| <= 0.5 * 10^-n; a percentage matches 100 v the
same way; thousands separators and the signs + and − (U+2212) are read as usual. A number is looked
up only in its own script's runs (cold, warm and benchmark) and configs, not in the long curves
(lists of more than LONG values). docs/tests.md says the same for readers.
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
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MAX_README_BYTES = 12_000


def numbers_in(text: str) -> list:
    """Quoted numbers in a table cell -> [(value, decimals, is_percent, as_written)]. Text in backticks
    (commands, code names such as `fig_1.png`), link targets and arXiv ids are not numbers we measured."""
    text = re.sub(r"`[^`]*`|arXiv \S+|\]\([^)]*\)", " ", text)
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
    """-> [(header cells, rows of cells)] for every pipe table. A `\\|` inside a cell is text, not a border."""
    out, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if current is None:
                current = (cells, [])
                out.append(current)
            elif not all(set(c) <= set("-: ") for c in cells):
                current[1].append(cells)
        else:
            current = None
    return out


def script_named(text: str):
    return next((s for s in SCRIPTS if f"`{s}.py`" in text), None)


def page_script(page: Path):
    """The runs a page quotes: docs/<script>.md -> that script, docs/base_model.md -> the base model."""
    if page.parent.name == "docs":
        return "pretrain" if page.stem == "base_model" else (page.stem if page.stem in SCRIPTS else None)
    return None


def quoted_column(header: str) -> bool:
    return header.startswith(("ours", "here", "CPU")) or "`cpu`" in header


def quoted_cells(markdown: str, script=None):
    """-> [(script, where, cell text)] for every cell a page quotes from a run."""
    cells = []
    for header, rows in tables(markdown):
        cols = [i for i, h in enumerate(header) if i > 0 and quoted_column(h)]
        for row in rows:
            owner = script or script_named(row[0])
            cells += [(owner, f"{row[0][:60]} / {header[i][:20]}", row[i]) for i in cols if i < len(row)]
    return cells


def stored_numbers(summary: dict, script: str) -> list:
    runs = {k: v for k, v in summary["runs"].items() if k == script or k.startswith(script + "_")}
    return pool(runs)


def number_problems(markdown: str, summary: dict, script=None) -> list:
    problems = []
    for owner, where, text in quoted_cells(markdown, script):
        if owner is None:
            problems.append(f"{where}: a quoted cell in a row that names no script")
            continue
        stored = stored_numbers(summary, owner)
        problems += [f"{where}: {w}" for v, d, pct, w in numbers_in(text) if not matches(v, d, pct, stored)]
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def link_problems(markdown: str, page: Path) -> list:
    """Every relative link and image on a page points at a file that exists (and a heading that
    exists, for links into a Markdown page)."""
    problems = []
    for target in LINK.findall(markdown):
        if re.match(r"[a-z]+:", target):
            continue  # https: and mailto: links leave the repository
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.name}: {target} (no such heading)")
    return problems


def figures_shown(markdown: str, page: Path) -> set:
    return {str((page.parent / t).resolve().relative_to(REPO)) for t in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)",
                                                                                         markdown)}


# --- the checks ---------------------------------------------------------------------------------------


def test_rounding_rule_and_number_parsing():
    assert [n[:3] for n in numbers_in("**0.41×** at 16 px, −0.49, 1,006 s, 14.3%, +0.110 [0.091, 0.131]")] == [
        (0.41, 2, False), (16, 0, False), (-0.49, 2, False), (1006, 0, False), (14.3, 1, True), (0.11, 3, False),
        (0.091, 3, False), (0.131, 3, False)]
    assert numbers_in("`fig_2.png` (arXiv 2605.10759) [page](docs/x2.md)") == []
    assert matches(0.747, 2, False, [0.7468]) and not matches(0.76, 2, False, [0.7468])
    assert matches(14.3, 1, True, [0.1432]) and not matches(14.3, 1, False, [0.1432])
    assert pool({"a": [1.5] * (LONG + 1), "b": {"16": "1,2"}, "c": True}) == [16.0, 1.0, 2.0]
    assert tables("| a | ours |\n| --- | --- |\n| x | 1 \\| 2 |\n")[0][1] == [["x", "1 | 2"]]


def test_every_page_quotes_its_script():
    """The README quotes every script; each paper has a page, and each page's tables quote its runs."""
    readme = quoted_cells((REPO / "README.md").read_text())
    assert {s for s, _, _ in readme} >= set(SCRIPTS), "a script went missing from the README's table"
    for script in SCRIPTS:
        page = REPO / "docs" / f"{script}.md"
        assert page.exists(), f"docs/{script}.md is missing"
        assert quoted_cells(page.read_text(), script), f"docs/{script}.md quotes no number in an 'ours' column"
    assert quoted_cells((REPO / "docs" / "base_model.md").read_text(), "pretrain")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_quoted_number_is_in_the_summary_of_the_quoted_run(page):
    summary = json.loads(SUMMARY.read_text())
    problems = number_problems(page.read_text(), summary, page_script(page))
    assert not problems, f"{page.name}: numbers not in assets/summary.json:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    problems = link_problems(page.read_text(), page)
    assert not problems, "\n".join(problems)


def test_every_figure_shown_exists_and_every_figure_in_assets_is_shown():
    shown = set().union(*(figures_shown(p.read_text(), p) for p in PAGES))
    present = {str(p.relative_to(REPO)) for p in (REPO / "assets").rglob("*.png")}
    assert not shown - present, f"shown but missing: {sorted(shown - present)}"
    assert not present - shown, f"in assets/ but never shown on any page: {sorted(present - shown)}"


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= MAX_README_BYTES, f"README.md is {len(readme.encode()):,} bytes"
    for script in SCRIPTS:  # every paper linked, with its page
        assert f"](docs/{script}.md)" in readme, f"the README does not link docs/{script}.md"
    assert len(re.findall(r"\(https://arxiv\.org/abs/\d{4}\.\d{5}\)", readme)) >= len(SCRIPTS)


def test_summary_is_the_cpu_run_and_every_step_passed():
    summary = json.loads(SUMMARY.read_text())
    assert summary["preset"] == "cpu"
    assert all(r["status"] == "ok" for r in summary["runs"].values())


def test_summary_md_is_the_summary_json():
    """assets/summary.md is what common.reproduce writes from assets/summary.json."""
    from common.reproduce import markdown

    assert (REPO / "assets" / "summary.md").read_text() == markdown(json.loads(SUMMARY.read_text()))


@pytest.fixture(scope="module")
def smoke_summary(tmp_path_factory):
    from common import reproduce

    return reproduce.main(["--preset", "smoke", "--out", str(tmp_path_factory.mktemp("reproduce"))])


def test_smoke_reproduce_has_the_keys_of_the_quoted_summary(smoke_summary):
    from common.reproduce import summary_keys

    assert all(r["status"] == "ok" for r in smoke_summary["runs"].values()), smoke_summary["runs"]
    assert summary_keys(smoke_summary) == summary_keys(json.loads(SUMMARY.read_text()))


# --- the checks can fail ------------------------------------------------------------------------------


def edit_first_number(text: str, cell: str) -> str | None:
    """The page with the first number of one quoted cell moved by two units of its last decimal."""
    found = numbers_in(cell)
    if not found:
        return None
    value, decimals, _, written = found[0]
    edited_value = value + 2 * 10 ** -decimals
    edited = f"{edited_value:.{decimals}f}" + ("%" if written.endswith("%") else "")
    return text.replace(cell, cell.replace(written, edited, 1), 1)


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "glossary.md"], ids=lambda p: p.name)
def test_a_number_edited_by_hand_is_caught_on_every_page(page):
    """On every page that quotes numbers, some edited number is reported (a neighbouring stored value can
    match an edit by chance, so the first cell whose edit is not matched counts)."""
    summary, text, script = json.loads(SUMMARY.read_text()), page.read_text(), page_script(page)
    cells = quoted_cells(text, script)
    if not cells:
        pytest.skip(f"{page.name} quotes no run")
    assert not number_problems(text, summary, script)
    for _, _, cell in cells:
        edited = edit_first_number(text, cell)
        if edited is not None and number_problems(edited, summary, script):
            return
    pytest.fail(f"no hand edit of a number on {page.name} was caught")


def test_a_broken_figure_or_link_is_caught():
    page = REPO / "docs" / "ram.md"
    text = page.read_text()
    figure = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", text).group(1)
    assert link_problems(text.replace(figure, figure.replace(".png", "_gone.png")), page)
    assert link_problems(text + "\nSee [the notes](notes_that_do_not_exist.md).\n", page)
    assert link_problems(text + "\nSee [tests](tests.md#no-such-heading).\n", page)
    assert not link_problems(text + "\nSee [tests](tests.md) and [the paper](https://arxiv.org/abs/1).\n", page)


def test_merge_into_replaces_only_the_rerun_scripts(tmp_path):
    from common.reproduce import merge_into

    def rec(s, v):
        return dict(seconds=s, status="ok", results=dict(v=v))

    old = dict(preset="cpu", machine="m", total_seconds=6.0, runs=dict(pretrain=rec(1, 0), ram=rec(2, 1),
               time_blind_fm=rec(3, 2), time_blind_fm_warm=rec(1, 2)),
               claims=[dict(script="ram", key="a"), dict(script="time_blind_fm", key="b")])
    (tmp_path / "summary.json").write_text(json.dumps(old))
    new = dict(preset="cpu", machine="m", total_seconds=9.0, runs=dict(time_blind_fm=rec(5, 7),
               time_blind_fm_warm=rec(2, 7)), claims=[dict(script="time_blind_fm", key="c")])
    merged = merge_into(tmp_path / "summary.json", new)
    assert list(merged["runs"]) == ["pretrain", "ram", "time_blind_fm", "time_blind_fm_warm"]
    assert merged["runs"]["ram"] == old["runs"]["ram"] and merged["runs"]["time_blind_fm"]["results"]["v"] == 7
    assert [c["key"] for c in merged["claims"]] == ["a", "c"]
    assert merged["total_seconds"] == 10
    with pytest.raises(Exception, match="preset"):
        merge_into(tmp_path / "summary.json", {**new, "preset": "smoke"})


def test_a_bar_inside_a_summary_cell_is_escaped():
    from common.reproduce import markdown

    summary = dict(preset="cpu", machine="m", torch="t", device="cpu", total_seconds=1.0, runs={},
                   claims=[dict(script="s", claim="c", paper="p", ours=0.5, criterion="|change| <= 0.05",
                                reproduced=True)])
    row = next(line for line in markdown(summary).splitlines() if line.startswith("| `s`"))
    assert len(tables(row)[0][0]) == 6  # six cells: the bar in the criterion did not split it
