"""Bad input is refused before any work: exit status 2, one line on stderr, no file written.

Each entry point's `run` is replaced by a stand-in that does what every real `run` does first
(`run_dir`: the config checks, then the run folder) and then fails the test: a bad input must be
refused by then. One case per entry point also runs as a real process, to check the whole CLI.
"""

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.config import run_dir

REPO = Path(__file__).resolve().parents[1]
ENTRY = {"pretrain": "common.pretrain", "ram": "ram", "ram_sweep": "ram_sweep",
         "forcing_kv": "forcing_kv", "lfm_stability": "lfm_stability",
         "attention_sinks": "attention_sinks", "time_blind_fm": "time_blind_fm", "reproduce": "common.reproduce"}
EVERY = ([["--bogus", "1"], ["--preset", "huge"], ["--seed", "-1"], ["--device", "tpu"], ["--seed", "nan"]]
         + ([] if torch.cuda.is_available() else [["--device", "cuda"]]))
BATTERY = {
    "pretrain": [["--ema", "2"], ["--ema", "1"], ["--p-uncond", "1.5"], ["--size", "18"], ["--steps", "0"],
                 ["--model", "huge"], ["--dataset", "cifar"], ["--lr", "nan"]],
    "ram": [["--group", "1"], ["--rounds", "0"], ["--ram-lr", "-1"], ["--n-eval", "3"]],
    "ram_sweep": [["--methods", "maybe"], ["--rounds", "0"]],
    "forcing_kv": [["--chunks", "1"], ["--sizes", "16,x"], ["--sizes", "18"],
                   ["--threshold", "1.5"], ["--attention", "cuda"]],
    "lfm_stability": [["--clusters", "100000"], ["--steps", "0"]],
    "attention_sinks": [["--layer", "99"], ["--ks", "1,50"], ["--ks", "0"], ["--n-samples", "0"]],
    "time_blind_fm": [["--decomp-d", "16"], ["--decomp-d", "256,x"], ["--sizes", "6"], ["--k", "0"],
                      ["--dataset", "cifar"]],
    "reproduce": [["--only", "nothing"]],
}
CASES = [(name, argv) for name, cases in BATTERY.items() for argv in cases + EVERY]


def out_cases(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    return [afile, afile / "below_a_file", Path("/proc/no_such_dir/run")]


def refuse(name, argv, monkeypatch, capsys, out):
    module = importlib.import_module(ENTRY[name])

    def stand_in(cfg):  # what every run does first, then: this input should have been refused by now
        run_dir(cfg, name)
        pytest.fail(f"{name} accepted {argv}")

    monkeypatch.setattr(module, "run", stand_in)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        module.main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, (name, argv)
    assert len(err) == 1 and "error:" in err[0], (name, argv, err)
    assert time.perf_counter() - t0 < 5
    return err[0]


@pytest.mark.parametrize("name, argv", CASES, ids=[f"{n}:{' '.join(a)}" for n, a in CASES])
def test_refused_in_one_line_before_anything_is_written(name, argv, monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    refuse(name, argv, monkeypatch, capsys, out)
    assert not out.exists()


@pytest.mark.parametrize("name", ENTRY)
def test_unusable_out_is_refused(name, monkeypatch, capsys, tmp_path):
    for out in out_cases(tmp_path):
        refuse(name, ["--preset", "smoke"], monkeypatch, capsys, out)
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.parametrize("name", ["ram", "attention_sinks"])
def test_the_real_command_line(name, tmp_path):
    """As a user meets it: a process, its exit status and its one line."""
    argv = {"ram": ["ram.py", "--group", "1"], "attention_sinks": ["attention_sinks.py", "--layer", "99"]}[name]
    proc = subprocess.run([sys.executable, *argv, "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"python {argv[0]}: error:")
    assert not (tmp_path / "run").exists()
