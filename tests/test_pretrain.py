import json

from common import pretrain

KEYS = {"params", "train_seconds", "evaluator_accuracy", "sample_accuracy_cfg", "sample_accuracy_nocfg", "fd_cfg"}


def test_smoke_run_writes_results_and_reuses_the_cache(tmp_path, monkeypatch):
    # A cache of its own: other test files train the same smoke model into the session's cache.
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    first = pretrain.main(["--preset", "smoke", "--out", str(tmp_path / "a")])
    assert KEYS <= set(first) and not first["loaded_from_cache"]
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["params"] == first["params"] > 0
    assert (tmp_path / "a" / "fig_samples.png").stat().st_size > 1000
    assert json.loads((tmp_path / "a" / "config.json").read_text())["preset"] == "smoke"
    second = pretrain.main(["--preset", "smoke", "--out", str(tmp_path / "b")])
    assert second["loaded_from_cache"] and second["train_seconds"] == first["train_seconds"]
    for k in ("sample_accuracy_cfg", "sample_accuracy_nocfg", "fd_cfg"):  # same seed, same numbers
        assert second[k] == first[k]


def test_custom_data_needs_its_own_cache_key(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "checkpoints"))  # the "not cached" checks need a fresh cache
    cfg = pretrain.Config(**{**pretrain.PRESETS["smoke"], "steps": 2})
    subset = pretrain.data_mod.shapes(64, cfg.size, seed=5)
    with pytest.raises(ValueError, match="data_key"):
        pretrain.base_model(cfg, "cpu", data=subset)
    assert not pretrain.base_model(cfg, "cpu", data=subset, data_key="subset-64")[1]["cached"]
    assert not pretrain.base_model(cfg, "cpu")[1]["cached"]  # the full-data model is another file
    assert pretrain.base_model(cfg, "cpu", data=subset, data_key="subset-64")[1]["cached"]
