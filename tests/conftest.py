"""Shared test setup: checkpoints go to a temporary folder, never the repository's cache."""

from pathlib import Path

import pytest

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
