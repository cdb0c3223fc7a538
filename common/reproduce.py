"""One command reproduces every headline number: the base model, then every paper script.

    python -m common.reproduce                     # cpu preset without CUDA (about an hour from nothing)
    python -m common.reproduce --preset smoke      # seconds per script; what the tests run
    python -m common.reproduce --only ram,attention_sinks
    python -m common.reproduce --markdown assets/summary.json   # only rewrite summary.md beside it
    python -m common.reproduce --overview true     # only rebuild assets/overview.png from assets/
    python -m common.reproduce --notebooks true    # only re-execute notebooks/*.ipynb, storing their outputs

Each step runs as its own process (`python <script> --preset P --out outputs/<script>`), so a
failing script is reported and the next one still runs, and each runtime is that script alone.
Scripts that cache trained models in checkpoints/ are run a second time ("warm") to time a rerun.
Every `results.json` is collected into `outputs/summary.json` (all numbers, with each run's
config) and `outputs/summary.md` (one row per claim: the paper's number, ours, whether it
reproduced at this scale, and the runtimes). The README quotes `assets/summary.json`, a copy of
the summary of the cpu run, and a test checks that every number it quotes is in there.
"""

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.config import REPO, BaseConfig, UserError, cli, field, resolve_device, run_dir, save_json
from common.plot import save_overview

# (name, command after `python`, caches trained models of its own: rerun warm)
STEPS = (
    ("pretrain", ["-m", "common.pretrain"], False),
    ("ram", ["ram.py"], False),
    ("attention_sinks", ["attention_sinks.py"], True),
    ("time_blind_fm", ["time_blind_fm.py"], True),
    ("lfm_stability", ["lfm_stability.py"], True),
    ("forcing_kv", ["forcing_kv.py"], True),
    ("forcing_kv_bench", ["forcing_kv.py", "--bench", "true"], False),
)
NAMES = tuple(name for name, _, _ in STEPS)
ASSETS = REPO / "assets"
# The README's overview picture, in the README's reading order: each script's method figure
# (fig_method.png) once it has one, else the figure that shows its result best.
OVERVIEW = (("attention_sinks", "sinks removed vs random keys removed", "fig_triplets.png"),
            ("time_blind_fm", "t read off one noisy image", "fig_estimator_rmse.png"),
            ("lfm_stability", "the same noise through many models", "fig_stability_grid.png"),
            ("ram", "RAM against Flow-GRPO", "fig_reward_vs_rounds.png"),
            ("forcing_kv", "static and dynamic heads", "fig_head_types.png"))


@dataclasses.dataclass
class Config(BaseConfig):
    only: str = field("", "comma-separated steps to run (default: all, in this order: " + ", ".join(NAMES) + ")",
                      shown="all")
    warm: bool = field(True, "rerun the scripts that cache trained models, to time a warm run")
    markdown: str = field("", "run nothing: rewrite summary.md beside this summary.json", shown="none")
    overview: bool = field(False, "run nothing: rebuild assets/overview.png from the figures in assets/")
    notebooks: bool = field(False, "run nothing else: execute every notebook in notebooks/ top to bottom and "
                                   "store its outputs (needs requirements-dev.txt)")
    into: str = field("", "merge the steps run (with --only) into this existing summary.json, and rewrite its "
                          "summary.md, instead of writing a new summary", shown="none")

    def validate(self):
        unknown = [s for s in self.only.split(",") if s and s not in NAMES]
        if unknown:
            raise UserError(f"--only: unknown step(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
        for flag, path in (("--into", self.into), ("--markdown", self.markdown)):
            if path and not Path(path).is_file():
                raise UserError(f"{flag} {path}: no such file; give the path of a summary.json")


PRESETS = {"smoke": dict(), "cpu": dict(), "gpu": dict()}  # the preset is passed on to every script


def cpu_model() -> str:
    """The CPU's model name (timings on different CPUs differ by 2x or more)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_step(name: str, args: list, cfg, out: Path, logs: Path) -> dict:
    """Run one script as its own process; its output goes to logs/<name>.log. -> the run's record."""
    folder = out / name
    cmd = [sys.executable, *args, "--preset", cfg.preset, "--seed", str(cfg.seed), "--device", cfg.device,
           "--out", str(folder)]
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = round(time.perf_counter() - t0, 1)
    record = dict(command="python " + " ".join(args + ["--preset", cfg.preset]), seconds=seconds,
                  status="ok" if rc == 0 else f"failed (exit status {rc})")
    try:
        record["config"] = json.loads((folder / "config.json").read_text())
        # where the run wrote, relative to the repository: a summary names no machine's folders
        record["config"]["out"] = str(folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder.name)
        results_file = folder / ("bench.json" if "--bench" in args else "results.json")
        record["results"] = json.loads(results_file.read_text())
    except (OSError, ValueError) as e:
        record["status"] = record["status"] if rc else f"failed ({type(e).__name__}: no readable results)"
    if rc:
        tail = (logs / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
        record["error"] = tail[0][-300:]
    return record


def claim_rows(runs: dict) -> list:
    """Every script's `claims` as one flat list, each row naming its script."""
    return [dict(script=name, **c) for name, rec in runs.items() if not name.endswith("_warm")
            for c in rec.get("results", {}).get("claims", [])]


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "-"}[v]
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def cell(v) -> str:
    """A value as a Markdown table cell: a `|` inside it would end the cell, so it is escaped."""
    return fmt(v).replace("|", "\\|")


def markdown(summary: dict) -> str:
    runs = summary["runs"]
    machine = ", ".join(filter(None, (summary["machine"], summary.get("cpu_model"))))
    lines = [f"# Reproduction summary: `python -m common.reproduce --preset {summary['preset']}`", "",
             f"{machine}; torch {summary['torch']}; device {summary['device']}; "
             f"{summary['total_seconds']:,.0f} s in all.", "",
             "| script | claim | paper | ours | test | reproduced here |", "| --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join([f"`{c['script']}`", *(cell(c[k]) for k in ("claim", "paper", "ours", "criterion",
                                                                          "reproduced"))]) + " |"
              for c in summary["claims"]]
    lines += ["", "| step | status | cold (s) | warm rerun (s) |", "| --- | --- | --- | --- |"]
    for name, rec in runs.items():
        if not name.endswith("_warm"):
            warm = runs.get(f"{name}_warm", {}).get("seconds")
            lines.append(f"| {name} | {rec['status']} | {fmt(rec['seconds'])} | {fmt(warm)} |")
    lines += ["", "Cold: each script's own models trained, the base model and evaluator (the `pretrain` step) "
              "already cached; `ram` also trains the evaluators of seeds 1 and 2, which later scripts find cached. "
              "Warm: everything cached."]
    notes = [f"- `{name}`: {rec['note']}" for name, rec in runs.items() if rec.get("note")]
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


def summary_keys(summary: dict) -> dict:
    """The shape of a summary that must not depend on the preset: steps, and each script's claims.
    Numbers inside a claim's key are sizes that a preset sets (speedup_by_size.64 at cpu is
    speedup_by_size.16 at smoke), so they are left out: 'speedup_by_size.#'; a preset with fewer
    budgets (attention_sinks' --ks) makes the same kinds of claim, fewer times."""
    return dict(top=sorted(summary), runs=sorted(summary["runs"]),
                claims=sorted({re.sub(r"\d+", "#", f"{c['script']}:{c['key']}") for c in summary["claims"]}))


def overview(assets: Path = ASSETS) -> Path:
    """assets/overview.png: one figure per script, each script's fig_method.png where it has one."""
    panels = []
    for script, caption, fallback in OVERVIEW:
        method = assets / script / "fig_method.png"
        panels.append((f"{script}.py\n{caption}", method if method.exists() else assets / script / fallback))
    save_overview(panels, assets / "overview.png")
    return assets / "overview.png"


def merge_into(path: Path, new: dict) -> dict:
    """An existing summary with the runs and claims of the steps in `new` replaced by new's: one script
    rerun after a change, the others kept as they were measured. Both must come from the same preset."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--into {path}: not a readable summary.json ({type(e).__name__})") from None
    if old["preset"] != new["preset"]:
        raise UserError(f"--into {path}: that summary is of preset {old['preset']}, this run of {new['preset']}")
    runs = {**old["runs"], **new["runs"]}
    scripts = {name for name in new["runs"] if not name.endswith("_warm")}
    claims = [c for c in old["claims"] if c["script"] not in scripts] + new["claims"]
    order = {name: i for i, name in enumerate(NAMES)}
    claims.sort(key=lambda c: order.get(c["script"], len(order)))
    merged = {**old, **{k: v for k, v in new.items() if k not in ("runs", "claims", "total_seconds")}}
    return {**merged, "runs": runs, "claims": claims,
            "total_seconds": round(sum(r["seconds"] for r in runs.values()), 1)}


def execute_notebook(path: Path, timeout: int = 600, write: bool = True) -> float:
    """Run one notebook top to bottom in a fresh kernel, from the repository root (so `import ram`
    works), and store its outputs in the file. An error in any cell raises. -> seconds taken."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError:
        raise UserError("executing notebooks needs nbformat, nbclient and ipykernel: "
                        "pip install -r requirements-dev.txt") from None
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    seconds = time.perf_counter() - t0
    if write:
        nbformat.write(nb, path)
    return seconds


def run(cfg: Config) -> dict:
    if cfg.notebooks:
        times = {}
        for path in sorted((REPO / "notebooks").glob("*.ipynb")):
            times[path.name] = round(execute_notebook(path), 1)
            print(f"{path.name}: executed in {times[path.name]} s, outputs stored")
        return times
    if cfg.markdown:  # no run: the table of an existing summary
        src = Path(cfg.markdown)
        try:
            summary = json.loads(src.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--markdown {src}: not a readable summary.json ({type(e).__name__})") from None
        (src.parent / "summary.md").write_text(markdown(summary))
        print(f"wrote {src.parent / 'summary.md'}")
        return summary
    if cfg.overview:
        print(f"wrote {overview()}")
        return {}
    out = run_dir(cfg, "")  # outputs/ by default: the scripts' own default folders sit inside it
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    chosen = [s for s in STEPS if not cfg.only or s[0] in cfg.only.split(",")]
    plan = [(name, args) for name, args, _ in chosen] + [(f"{name}_warm", args) for name, args, warm in chosen
                                                         if warm and cfg.warm]
    t0, runs = time.perf_counter(), {}
    for i, (name, args) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {name}: python {' '.join(args)} --preset {cfg.preset} (log: {logs / name}.log)",
              flush=True)
        runs[name] = run_step(name, args, cfg, out, logs)
        print(f"      {runs[name]['status']} in {runs[name]['seconds']:,.1f} s", flush=True)
    summary = dict(preset=cfg.preset, seed=cfg.seed, device=str(resolve_device(cfg.device)), torch=torch.__version__,
                   machine=f"{platform.machine()}, {os.cpu_count()} CPU cores", cpu_model=cpu_model(),
                   total_seconds=round(time.perf_counter() - t0, 1), runs=runs, claims=claim_rows(runs))
    if cfg.into:
        summary = merge_into(Path(cfg.into), summary)
        out = Path(cfg.into).parent
    save_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    failed = [n for n, r in runs.items() if r["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)} (see their logs)", file=sys.stderr)
    return summary


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python -m common.reproduce", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
