import torch

from common.train import EMA, checkpoint_path, load_checkpoint, load_or_train, save_checkpoint


def test_ema_matches_the_formula_in_and_after_the_warm_up():
    """shadow <- decay * shadow + (1 - decay) * live, with decay = min(decay, (1 + n) / (10 + n)) at the n-th
    update. At decay 0.9 a swap of decay and 1 - decay, or a skipped warm-up, gives other numbers."""
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    shadow = model.weight.detach().clone()
    for n in range(1, 41):  # warm-up (decay 2/11, 3/12, ...) and then the plain 0.9 from n = 80 / 10 on
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * model.weight.detach()
        assert torch.allclose(ema.shadow["weight"], shadow, atol=1e-5), n
    ema.copy_to(model)
    assert torch.allclose(model.weight, shadow, atol=1e-5)


def test_ema_decay_after_the_warm_up_is_the_configured_one():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    ema.updates = 1000  # far past the warm-up
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 0.1)  # moved by (1 - decay) of the step


def test_checkpoint_cache_roundtrip_corrupt_and_mismatch(capsys):
    cfg, calls = dict(kind="test", a=1), []

    def fit(model):
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(0.25)
        return dict(note="trained")

    m = torch.nn.Linear(3, 2)
    info = load_or_train("unit", cfg, m, fit)
    assert not info["cached"] and info["note"] == "trained" and len(calls) == 1
    path = checkpoint_path("unit", cfg)
    assert path.exists() and not list(path.parent.glob(".*.tmp"))  # atomic: no temp file left

    m2 = torch.nn.Linear(3, 2)
    info2 = load_or_train("unit", cfg, m2, fit)
    assert info2["cached"] and len(calls) == 1 and torch.all(m2.weight == 0.25)
    assert info2["train_seconds"] == info["train_seconds"]

    assert load_checkpoint(path, dict(kind="test", a=2)) is None  # another config
    assert "another config" in capsys.readouterr().out

    path.write_bytes(path.read_bytes()[:50])  # truncated file
    info3 = load_or_train("unit", cfg, torch.nn.Linear(3, 2), fit)
    assert not info3["cached"] and len(calls) == 2
    assert "unreadable" in capsys.readouterr().out
    save_checkpoint(path, dict(model={}, config=cfg))  # missing train_seconds
    assert load_checkpoint(path, cfg) is None


def test_checkpoint_that_does_not_fit_is_retrained_from_the_untouched_model(capsys):
    cfg = dict(kind="test", shape="mismatch")
    save_checkpoint(checkpoint_path("unit2", cfg), dict(model={"weight": torch.ones(2, 3)}, config=cfg,
                                                        train_seconds=1.0))
    model = torch.nn.Linear(3, 2)  # has a bias the checkpoint lacks: strict loading fails
    before = model.weight.detach().clone()
    seen = {}

    def fit(m):
        seen["w"] = m.weight.detach().clone()
        return {}

    info = load_or_train("unit2", cfg, model, fit)
    assert not info["cached"] and "does not fit" in capsys.readouterr().out
    assert torch.equal(seen["w"], before)  # training started from the model's own init
