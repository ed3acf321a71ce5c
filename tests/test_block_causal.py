"""Block-causal attention over the real diffusers Wan transformer (groundwork of the Self-Forcing issue): the block
layouts, causality under the mask, per-frame timesteps, and KV-cache inference equal to the masked recomputation."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from simpletuner_dmd.families.block_causal import BlockCausalWan, KVCache, frame_blocks, frame_timesteps

FRAMES, H, W = 5, 4, 4


def test_frame_blocks_layouts():
    assert frame_blocks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert frame_blocks(7, 3, independent_first_frame=True) == [(0, 1), (1, 4), (4, 7)]
    assert frame_blocks(21, 3) == [(i, i + 3) for i in range(0, 21, 3)]
    with pytest.raises(ValueError):
        frame_blocks(0, 3)


@pytest.fixture(scope="module")
def causal(tiny_wan):
    torch.manual_seed(0)
    network = WanTransformer3DModel.from_pretrained(tiny_wan / "transformer").eval()
    return BlockCausalWan(network)


def _run(causal, x, t_frames, cond):
    tokens = causal.tokens_per_frame(x)
    with torch.no_grad():
        return causal.network(x, timestep=frame_timesteps(t_frames, tokens), encoder_hidden_states=cond,
                              return_dict=False)[0]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 16, FRAMES, H, W), generator=g)
    t = torch.tensor([[900.0, 900.0, 500.0, 500.0, 100.0]])
    cond = torch.randn((1, 8, 32), generator=g)
    return x, t, cond


def test_a_later_block_changes_nothing_before_it_under_the_mask(causal):
    blocks = frame_blocks(FRAMES, 2, independent_first_frame=True)  # [0], [1, 2], [3, 4]
    x, t, cond = _inputs()
    tokens = causal.tokens_per_frame(x)
    with causal.masked(blocks, tokens):
        before = _run(causal, x, t, cond)
        x2, t2 = x.clone(), t.clone()
        x2[:, :, 3:] = torch.randn_like(x2[:, :, 3:])  # the last block's input and timestep
        t2[:, 3:] = 250.0
        after = _run(causal, x2, t2, cond)
        changed_middle = x.clone()
        changed_middle[:, :, 1:3] += 1.0
        middle = _run(causal, changed_middle, t, cond)
    assert torch.allclose(before[:, :, :3], after[:, :, :3], atol=1e-6)
    assert not torch.allclose(before[:, :, 3:], after[:, :, 3:], atol=1e-3)
    assert torch.allclose(before[:, :, :1], middle[:, :, :1], atol=1e-6)  # the first frame sees only itself
    assert not torch.allclose(before[:, :, 3:], middle[:, :, 3:], atol=1e-3)  # a later block sees the earlier ones
    # outside the context manager the network is bidirectional again: the first frame sees the last block
    plain_before, plain_after = _run(causal, x, t, cond), _run(causal, x2, t2, cond)
    assert not torch.allclose(plain_before[:, :, :1], plain_after[:, :, :1], atol=1e-4)


def test_the_plain_network_is_untouched_outside_the_causal_contexts(causal, tiny_wan):
    reference = WanTransformer3DModel.from_pretrained(tiny_wan / "transformer").eval()
    x, t, cond = _inputs(1)
    tokens = causal.tokens_per_frame(x)
    with torch.no_grad():
        expected = reference(x, timestep=frame_timesteps(t, tokens), encoder_hidden_states=cond,
                             return_dict=False)[0]
    assert torch.equal(_run(causal, x, t, cond), expected)


@pytest.mark.parametrize("independent_first_frame", [False, True])
def test_kv_cache_inference_equals_the_masked_recomputation(causal, independent_first_frame):
    blocks = frame_blocks(FRAMES, 2, independent_first_frame=independent_first_frame)
    x, t, cond = _inputs(2)
    tokens = causal.tokens_per_frame(x)
    with causal.masked(blocks, tokens):
        full = _run(causal, x, t, cond)
    cache = KVCache(writing=True)
    pieces = []
    for start, end in blocks:
        with causal.cached(cache, start, tokens):
            pieces.append(_run(causal, x[:, :, start:end], t[:, start:end], cond))
        assert cache.frames == end  # every block's keys and values written once
    assert torch.allclose(torch.cat(pieces, dim=2), full, atol=1e-5)


def test_a_rolling_window_bounds_the_cache(causal):
    blocks = frame_blocks(FRAMES, 1)
    x, t, cond = _inputs(3)
    tokens = causal.tokens_per_frame(x)
    cache = KVCache(writing=True, window=2)
    for start, end in blocks:
        with causal.cached(cache, start, tokens):
            _run(causal, x[:, :, start:end], t[:, start:end], cond)
        assert cache.frames == min(end, 2)
    assert all(sum(c.shape[1] for c in k) == 2 * tokens for k in cache.keys.values()) and cache.tokens() == 2 * tokens


def test_passes_that_keep_the_cache_share_its_chunks(causal):
    """Each cached pass keeps the cache as it was (for a recompute in its backward): those snapshots hold the very
    chunks the cache holds, so the keys and values of a clip are in memory once however many passes keep them."""
    blocks = frame_blocks(FRAMES, 1)
    x, t, cond = _inputs(4)
    tokens = causal.tokens_per_frame(x)
    cache, kept = KVCache(writing=True), []
    hook = causal.network.rope.register_forward_hook(lambda _m, _i, out: kept.append(out.past))
    try:
        for start, end in blocks:
            with causal.cached(cache, start, tokens):
                _run(causal, x[:, :, start:end], t[:, start:end], cond)
    finally:
        hook.remove()
    held = {c.untyped_storage().data_ptr() for chunks in [*cache.keys.values(), *cache.values.values()]
            for c in chunks}
    snapshots = {c.untyped_storage().data_ptr() for past in kept for side in past for chunks in side.values()
                 for c in chunks}
    assert len(kept) == FRAMES and snapshots <= held
    assert len(held) == 2 * FRAMES * len(cache.keys)  # one key and one value chunk per block and layer


def _grads(network, loss_fn):
    network.zero_grad(set_to_none=True)
    loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])


def test_gradient_checkpointing_recomputes_the_same_attention(tiny_wan):
    """The mask and the cache travel with the blocks' inputs: a checkpointed recompute in the backward (after the
    context has closed, and after a later block has extended the cache) gives the same gradients."""
    def grads(checkpointing: bool):
        torch.manual_seed(0)
        network = WanTransformer3DModel.from_pretrained(tiny_wan / "transformer").train()
        if checkpointing:
            network.enable_gradient_checkpointing()
        causal = BlockCausalWan(network)
        x, t, cond = _inputs(4)
        tokens = causal.tokens_per_frame(x)
        blocks = frame_blocks(FRAMES, 2, independent_first_frame=True)

        def masked_loss():
            with causal.masked(blocks, tokens):
                out = network(x, timestep=frame_timesteps(t, tokens), encoder_hidden_states=cond,
                              return_dict=False)[0]
            return out.square().mean()

        def cached_loss():
            cache = KVCache(writing=True)
            with torch.no_grad(), causal.cached(cache, 0, tokens):  # the context write of the first block
                network(x[:, :, :1], timestep=frame_timesteps(t[:, :1], tokens), encoder_hidden_states=cond)
            with causal.cached(cache, 1, tokens):  # the next block's exit step, with grad, reading the cache
                out = network(x[:, :, 1:3], timestep=frame_timesteps(t[:, 1:3], tokens), encoder_hidden_states=cond,
                              return_dict=False)[0]
            with torch.no_grad(), causal.cached(cache, 1, tokens):  # its context write extends the cache …
                network(x[:, :, 1:3], timestep=frame_timesteps(t[:, 1:3], tokens), encoder_hidden_states=cond)
            return out.square().mean()  # … before the backward

        return _grads(network, masked_loss), _grads(network, cached_loss)

    plain_masked, plain_cached = grads(False)
    ckpt_masked, ckpt_cached = grads(True)
    assert torch.allclose(plain_masked, ckpt_masked, atol=1e-6, rtol=1e-5)
    assert torch.allclose(plain_cached, ckpt_cached, atol=1e-6, rtol=1e-5)
