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

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True, scope="session")
def _tmp_checkpoints(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CHECKPOINT_DIR", str(tmp_path_factory.mktemp("checkpoints")))
    yield
    mp.undo()


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("../shared/data/mnist is absent")
    return MNIST_DIR
