import pytest
import torch

from common.dit import TinyDiT, attention, attention_hook, attention_ref, patchify, unpatchify


def randomised(model: TinyDiT, seed=0) -> TinyDiT:
    """Replace the zero-initialised layers by random weights, so outputs depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(B=3, S=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, S, S, generator=g), torch.rand(B, generator=g), torch.randint(0, 9, (B,), generator=g)


def test_untrained_model_predicts_zero():
    x, t, y = inputs()
    out = TinyDiT(img_size=8, patch=2, width=32, depth=2, heads=2)(x, t, y)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_time_blind_model_ignores_t_and_conditioned_one_does_not():
    x, t, y = inputs()
    blind = randomised(TinyDiT(img_size=8, patch=2, width=32, depth=2, heads=2, time_cond=False))
    cond = randomised(TinyDiT(img_size=8, patch=2, width=32, depth=2, heads=2, time_cond=True))
    assert not any("t_embed" in n for n, _ in blind.named_parameters())
    assert torch.equal(blind(x, t, y), blind(x, 1 - t, y))
    assert not torch.allclose(cond(x, t, y), cond(x, 1 - t, y))


def test_label_changes_output_and_null_label_works():
    x, t, y = inputs()
    m = randomised(TinyDiT(img_size=8, patch=2, width=32, depth=2, heads=2))
    assert not torch.allclose(m(x, t, y), m(x, t, (y + 1) % 9))
    null = torch.full_like(y, m.null_label)
    assert torch.equal(m(x, t, null), m(x, t, None))  # no label means the null label


def test_reference_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    assert torch.allclose(attention_ref(q, k, v), attention(q, k, v), atol=1e-5)
    mask = torch.rand(5, 5, generator=g) > 0.3
    mask[:, 0] = True  # every query keeps one key
    assert torch.allclose(attention_ref(q, k, v, mask), attention(q, k, v, mask), atol=1e-5)


def test_hook_can_record_probabilities_and_reproduce_the_forward():
    x, t, y = inputs()
    m = randomised(TinyDiT(img_size=8, patch=2, width=32, depth=2, heads=2))
    recorded = {}

    def record(q, k, v, layer):
        out, probs = attention_ref(q, k, v, return_probs=True)
        recorded[layer] = probs
        return out

    with attention_hook(m, record):
        hooked = m(x, t, y)
    assert m.attn_hook is None  # restored on exit
    assert torch.allclose(hooked, m(x, t, y), atol=1e-5)
    N = m.n_ctx + (8 // 2) ** 2
    assert set(recorded) == {0, 1} and recorded[0].shape == (3, 2, N, N)
    assert torch.allclose(recorded[1].sum(-1), torch.ones(3, 2, N), atol=1e-5)


def test_hook_can_attend_to_extra_cached_keys_with_a_mask():
    """A cache hook prepends keys/values from elsewhere: masked out, they leave the plain forward;
    visible, they change it."""
    x, t, y = inputs()
    m = randomised(TinyDiT(img_size=8, patch=2, width=32, depth=2, heads=2))
    plain, extra = m(x, t, y), 4

    def cache_hook(visible: bool):
        def hook(q, k, v, layer):
            k_all = torch.cat([k[:, :, :extra].flip(0) * 3, k], 2)  # stand-in "cached" keys/values
            v_all = torch.cat([v[:, :, :extra].flip(0) * 3, v], 2)
            mask = torch.ones(q.shape[2], k_all.shape[2], dtype=torch.bool)
            mask[:, :extra] = visible
            return attention(q, k_all, v_all, mask)
        return hook

    with attention_hook(m, cache_hook(False)):
        assert torch.allclose(m(x, t, y), plain, atol=1e-5)
    with attention_hook(m, cache_hook(True)):
        assert not torch.allclose(m(x, t, y), plain, atol=1e-3)


def test_patchify_roundtrip_and_bad_size():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 12)
    assert torch.equal(unpatchify(tokens, 2, 3, 8), x)
    with pytest.raises(ValueError, match="not divisible"):
        TinyDiT(img_size=10, patch=4)


def test_time_blind_twin_shares_all_other_initial_weights():
    torch.manual_seed(3)
    cond = TinyDiT(img_size=8, patch=2, width=32, depth=2, heads=2, time_cond=True).state_dict()
    torch.manual_seed(3)
    blind = TinyDiT(img_size=8, patch=2, width=32, depth=2, heads=2, time_cond=False).state_dict()
    assert set(cond) - set(blind) == {k for k in cond if k.startswith("t_embed")}
    assert all(torch.equal(cond[k], blind[k]) for k in blind)
