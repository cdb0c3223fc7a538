"""Attention of a chunk's queries over per-head, variable-length (compressed) key/value caches.

A compressed KV cache (forcing_kv.py) keeps a different number of tokens for every (batch, head):
static heads keep a few whole frames, dynamic heads keep more. It is stored *packed*: all kept keys
of all (b, h) pairs one after another in one (T, Dh) tensor, with `offsets[b, h]` and
`lengths[b, h]` saying where each pair's run starts and how long it is. No padding, no mask: the
memory held is exactly the tokens kept.

    q:                  (B, H, Nq, Dh)   the current chunk's queries
    k_packed, v_packed: (T, Dh)          every (b, h) pair's cached keys/values, back to back
    offsets, lengths:   (B, H) int       pair (b, h) owns rows offsets[b, h] : offsets[b, h] + lengths[b, h]
    k_new, v_new:       (B, H, Nn, Dh)   the chunk's own keys/values (attended by every query)
    -> out:             (B, H, Nq, Dh)   softmax(q [k_cache; k_new]^T / sqrt(Dh)) [v_cache; v_new]

`varlen_attention_ref` is the obvious version (a Python loop over pairs); the fused Triton kernel
beside it must agree with it.
"""

import torch

from common.dit import attention_ref


def varlen_attention_ref(q, k_packed, v_packed, offsets, lengths, k_new, v_new):
    """The reference: for each (b, h), slice its cached run, append the chunk's own keys/values and
    run plain softmax attention. Slow (a Python loop over B * H pairs) and obviously right."""
    B, H, Nq, Dh = q.shape
    assert k_packed.shape == v_packed.shape and k_packed.shape[1] == Dh, "packed K/V must be (T, Dh)"
    assert offsets.shape == lengths.shape == (B, H), "offsets and lengths must be (B, H)"
    assert k_new.shape[:2] == (B, H) and k_new.shape == v_new.shape, "k_new, v_new must be (B, H, Nn, Dh)"
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            s, n = int(offsets[b, h]), int(lengths[b, h])
            k = torch.cat([k_packed[s:s + n], k_new[b, h]])  # (n + Nn, Dh)
            v = torch.cat([v_packed[s:s + n], v_new[b, h]])
            out[b, h] = attention_ref(q[b, h][None, None], k[None, None], v[None, None])[0, 0]
    return out
