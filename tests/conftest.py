"""Shared test setup: checkpoints go to a temporary folder, never the repository's cache."""

import os
from pathlib import Path

import pytest
import torch

# tests/test_varlen_attention.py runs the fused Triton kernel on the CPU through Triton's interpreter.
# Triton reads TRITON_INTERPRET once, when it is first imported, and any test module collected earlier
# may import it (forcing_kv.py imports common/varlen_attention.py, which imports triton; so does
# torch._dynamo), so the switch is set here, before all of them. Only without CUDA: there no compiled
# Triton kernel can launch anyway, so nothing else changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The real-data tests read MNIST's test files from $MNIST_DIR, else from data/mnist in the repository,
# else from a sibling folder shared/data/mnist (where CI keeps its fixtures); they skip without them.
REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = (Path(os.environ.get("MNIST_DIR", REPO / "data" / "mnist")), REPO.parent / "shared" / "data" / "mnist")
MNIST_DIR = next((d for d in _CANDIDATES if (d / "t10k-images-idx3-ubyte.gz").exists()), _CANDIDATES[0])


@pytest.fixture(autouse=True, scope="session")
def _tmp_checkpoints(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CHECKPOINT_DIR", str(tmp_path_factory.mktemp("checkpoints")))
    yield
    mp.undo()


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST test files in {MNIST_DIR} (see README: real data)")
    return MNIST_DIR
