"""Ctrl-C during a run: one line, exit status 130, and no results.json in the run folder (a folder holds
results.json only when its run finished, so an interrupted run never looks like a finished one)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# the pretrain smoke run is given steps it cannot finish: on an idle machine it ends in about a second
@pytest.mark.parametrize("entry", [["-m", "common.pretrain", "--steps", "100000"], ["attention_sinks.py"]],
                         ids=["pretrain", "attention_sinks"])
def test_ctrl_c_prints_one_line_exits_130_and_leaves_no_results(entry, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")  # an earlier run's results: they must not outlive this run's start
    env = dict(os.environ, CHECKPOINT_DIR=str(tmp_path / "ckpt"), PYTHONUNBUFFERED="1")
    # A shell that starts the suite in the background (`pytest &` in a script) hands its children SIGINT
    # ignored, and Python then never raises KeyboardInterrupt: give the run the default, as a terminal does.
    proc = subprocess.Popen([sys.executable, *entry, "--preset", "smoke", "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not (out / "config.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    time.sleep(0.5)  # inside the work: the config is written before anything is trained
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] and len(err.strip().splitlines()) <= 2, err
    assert (out / "config.json").exists() and not (out / "results.json").exists()
