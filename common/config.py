"""The CLI contract shared by common.pretrain and every paper script.

A script declares one flat dataclass `Config(BaseConfig)` whose fields carry a help text
(`field(default, help)`), optionally a `validate()` method for constraints between fields
(raise UserError), and a dict of named presets: `smoke` (tests, seconds), `cpu` (the
default without CUDA, minutes on a laptop) and `gpu` (the default with CUDA). `parse` turns that
into an argparse CLI: preset values first, then any flag given on the command line.
`cli(run, Config, PRESETS, argv)` is the whole `main` of a script: bad input (unknown option,
preset or device, negative steps, CUDA requested without CUDA, a missing dataset) ends with a
one-line `error: ...` and exit status 2, never a traceback.
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """Something the user can fix (a flag, a file); printed as one line by `cli`."""


def field(default, help: str, **kw):
    """A dataclass field with its --help text. Bounds checked by `parse`: ints >= 1 and floats
    > 0 unless `min=` says otherwise (e.g. min=0); `choices=` restricts strings."""
    return dataclasses.field(default=default, metadata=dict(help=help, **kw))


@dataclasses.dataclass
class BaseConfig:
    preset: str = field("cpu", "named preset: smoke (tests, seconds), cpu (minutes), gpu")
    seed: int = field(0, "seed of every random draw; the same seed gives the same results on CPU", min=0)
    device: str = field("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available)")
    out: str = field("", "run folder for config.json, results.json and figures (default outputs/<script>)")


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
        choices = f.metadata.get("choices")
        if choices and val not in choices:
            raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {val!r}")
    if hasattr(cfg, "validate"):  # constraints between fields, checked before any work starts
        cfg.validate()


def parse(Config, presets: dict, argv=None, prog=None, description=None):
    """argv -> a validated Config instance (preset values, then explicit flags)."""
    p = _Parser(prog=prog, description=description,
                epilog=f"presets: {', '.join(presets)} (a preset sets defaults; flags override them)")
    for f in dataclasses.fields(Config):
        kind = f.type if isinstance(f.type, type) else type(f.default)
        flag = "--" + f.name.replace("_", "-")
        text = (f.metadata.get("help", "") + f" (default: {f.default})").replace("%", "%%")  # argparse formats help
        if kind is bool:
            p.add_argument(flag, type=_bool, default=argparse.SUPPRESS, metavar="{true,false}",
                           help=text)
        else:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                           help=text)
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
    """Create the run folder and write config.json into it."""
    out = Path(cfg.out) if cfg.out else REPO / "outputs" / script
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return out


def save_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


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
    """The whole `main` of a script: parse, run, and turn a UserError into one line."""
    cfg = parse(Config, presets, argv, prog=prog, description=description)
    try:
        return run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
