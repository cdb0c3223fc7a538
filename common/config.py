"""The CLI contract shared by common.pretrain and every paper script.

A script declares one flat dataclass `Config(BaseConfig)` whose fields carry a help text
(`field(default, help)`), optionally a `validate()` method for constraints between fields
(raise UserError), and a dict of named presets: `smoke` (tests, seconds), `cpu` (the
default without CUDA, minutes on a laptop) and `gpu` (the default with CUDA). `parse` turns that
into an argparse CLI: preset values first, then any flag given on the command line.
`cli(run, Config, PRESETS, argv)` is the whole `main` of a script: bad input (unknown option,
preset or device, negative steps, CUDA requested without CUDA, an --out that cannot be a folder, a
missing dataset) ends with a one-line `python <script>: error: ...` and exit status 2, never a
traceback, and every bound known before the work starts is checked before anything is written.

From a notebook: `Config(preset="smoke", seed=3)` applies the preset of the module that defines
`Config` (its `PRESETS` dict) to every field not given, and `run(cfg)` checks the config before it
writes anything, exactly as the command line does.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """Something the user can fix (a flag, a file); printed as one line by `cli`."""


def field(default, help: str, **kw):
    """A dataclass field with its --help text. Bounds checked by `parse`: ints >= 1 and floats
    > 0 unless `min=` says otherwise (e.g. min=0); `max=` (inclusive) or `below=` (exclusive) cap
    numbers; `choices=` restricts strings; `shown=` is what --help prints for an empty default."""
    return dataclasses.field(default=default, metadata=dict(help=help, **kw))


@dataclasses.dataclass
class BaseConfig:
    preset: str = field("cpu", "named preset: smoke (tests, seconds), cpu (the default without CUDA: minutes on a "
                               "laptop CPU), gpu (the default with CUDA)", choices=("smoke", "cpu", "gpu"))
    seed: int = field(0, "seed of every random draw; the same seed gives the same results on CPU", min=0)
    device: str = field("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available)")
    out: str = field("", "run folder for config.json, results.json and figures", shown="outputs/<script>")

    def __new__(cls, *args, **kwargs):
        # Remember which fields the caller gave, so __post_init__ can fill the others from the preset.
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        object.__setattr__(self, "_given", set(names[:len(args)]) | set(kwargs))
        return self

    def __post_init__(self):
        """Config(preset="smoke") means the smoke preset, as `--preset smoke` does: every field the
        caller did not give takes the preset's value (from the defining module's PRESETS)."""
        presets = getattr(sys.modules.get(type(self).__module__), "PRESETS", None)
        if isinstance(presets, dict) and self.preset in presets:
            for name, value in presets[self.preset].items():
                if name not in self._given:
                    setattr(self, name, value)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu. A CUDA request without CUDA is an error, not a
    silent fallback: the numbers of a CPU run would be reported as a GPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was requested but this torch sees no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def int_list(text: str, flag: str, lo: int = 1) -> list:
    """'8,16,32' -> [8, 16, 32], or a UserError naming the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < lo:
        raise UserError(f"{flag} values must be >= {lo}, got {text!r}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the message says what to fix
        self.exit(2, f"{self.prog}: error: {message}\n")


def _check(cfg) -> None:
    for f in dataclasses.fields(cfg):
        val, name = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            pass
        elif isinstance(val, float) and not math.isfinite(val):
            raise UserError(f"{name} must be a finite number, got {val}")
        elif "min" in f.metadata and val < f.metadata["min"]:
            raise UserError(f"{name} must be >= {f.metadata['min']}, got {val}")
        elif "min" not in f.metadata and isinstance(val, int) and val < 1:
            raise UserError(f"{name} must be >= 1, got {val}")
        elif "min" not in f.metadata and isinstance(val, float) and not val > 0:
            raise UserError(f"{name} must be > 0, got {val}")
        elif "max" in f.metadata and val > f.metadata["max"]:
            raise UserError(f"{name} must be <= {f.metadata['max']}, got {val}")
        elif "below" in f.metadata and not val < f.metadata["below"]:
            raise UserError(f"{name} must be < {f.metadata['below']}, got {val}")
        choices = f.metadata.get("choices")
        if choices and val not in choices:
            raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {val!r}")
    if hasattr(cfg, "validate"):  # constraints between fields, checked before any work starts
        cfg.validate()
    resolve_device(cfg.device)  # an unknown device, or CUDA without CUDA
    if cfg.out:
        check_out(Path(cfg.out))


def check_out(out: Path) -> None:
    """An --out that can never be a run folder is refused before any work: an existing file, a
    path under a file, or a folder we may not write into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder for the run")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out} lies under the file {parent}; choose a folder for the run")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: no permission to write in {parent}")


def _default_text(f, presets: dict) -> str:
    """What --help says about a default: the value of every preset that changes it."""
    def show(v):
        if isinstance(v, bool):
            return str(v).lower()
        return f.metadata.get("shown", "none") if v == "" else str(v)

    base = presets.get("cpu", {}).get(f.name, f.default)
    others = [f"{p}: {show(v[f.name])}" for p, v in presets.items() if f.name in v and v[f.name] != base
              and p != "cpu"]
    return f"(default: {show(base)}" + (f"; {', '.join(others)}" if others else "") + ")"


def parse(Config, presets: dict, argv=None, prog=None, description=None):
    """argv -> a validated Config instance (preset values, then explicit flags)."""
    p = _Parser(prog=prog, description=description,
                epilog=f"presets: {', '.join(presets)}. A preset sets the defaults shown above (cpu's first, then "
                       "any preset that differs); flags override them. The default preset is cpu without CUDA, gpu "
                       "with it. Trained models are cached in checkpoints/ (or $CHECKPOINT_DIR).")
    for f in dataclasses.fields(Config):
        kind = f.type if isinstance(f.type, type) else type(f.default)
        flag = "--" + f.name.replace("_", "-")
        text = (f.metadata.get("help", "") + " " + _default_text(f, presets)).replace("%", "%%")  # argparse formats
        choices = f.metadata.get("choices")
        if f.name == "preset":
            choices = tuple(presets)
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else None
        if kind is bool:
            p.add_argument(flag, type=_bool, default=argparse.SUPPRESS, metavar="{true,false}", help=text)
        else:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=metavar, help=text)
    given = vars(p.parse_args(argv))  # argparse itself exits 2 with one line on unknown options
    preset = given.get("preset", "cpu" if not torch.cuda.is_available() else "gpu")
    if preset not in presets:
        p.error(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    values = {**presets[preset], **given, "preset": preset}
    cfg = Config(**values)
    try:
        _check(cfg)
    except UserError as e:
        p.error(str(e))
    return cfg


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def run_dir(cfg, script: str) -> Path:
    """Check the config (a notebook's `run(cfg)` gets the CLI's checks too), create the run folder
    and write config.json into it. Every run(cfg) calls this before any work, so a refused config
    never overwrites the config.json of an earlier run."""
    _check(cfg)
    out = Path(cfg.out) if cfg.out else REPO / "outputs" / script
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    # A folder holds results.json only when its run finished: an earlier run's results would otherwise sit
    # beside this run's config.json until this run writes its own (every script writes it last).
    (out / "results.json").unlink(missing_ok=True)
    save_json(out / "config.json", dataclasses.asdict(cfg))
    return out


def save_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves half a results.json."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def lookup(results: dict, key: str):
    """The value at a dotted path of a results dict ("by_selection.union.by_k.1.shift_ratio"); list
    items by index."""
    for part in key.split("."):
        results = results[int(part)] if isinstance(results, list) else results[part]
    return results


def claim_entry(results: dict, text: str, paper: str, key: str, criterion: str, ok, note: str = "") -> dict:
    """One entry of a script's `claims` list, the schema common/reproduce.py collects: ours is the value
    at `key`; ok (a bool, or a function of ours) decides `reproduced`; None: the toy cannot test it."""
    ours = lookup(results, key)
    ok = ok(ours) if callable(ok) else ok
    return dict(claim=text, paper=paper, ours=ours, key=key, criterion=criterion,
                reproduced=None if ok is None else bool(ok), note=note)


def print_table(rows: list[tuple], header: tuple = ("metric", "value")) -> None:
    """The short summary printed at the end of every run."""
    cells = [tuple(_fmt(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cli(run, Config, presets: dict, argv=None, prog=None, description=None) -> dict:
    """The whole `main` of a script: parse, run, and turn a UserError into one line (exit status 2) and
    Ctrl-C into one line (exit status 130, the shell's code for SIGINT) instead of a traceback."""
    cfg = parse(Config, presets, argv, prog=prog, description=description)
    name = prog or os.path.basename(sys.argv[0])
    try:
        return run(cfg)
    except UserError as e:  # the same one-line form as argparse's errors
        print(f"{name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; the run folder holds no results.json (cached models are kept)",
              file=sys.stderr)
        raise SystemExit(130) from None
