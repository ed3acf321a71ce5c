"""Block-causal attention over diffusers' ``WanTransformer3DModel``, without forking the model class.

Self-Forcing's causal student is Wan with two changes (``docs/config.md``, "Keys that need a block-causal model"):

- **A block-causal mask over latent frames.** The frames are split into blocks (``frame_blocks``: ``n`` frames
  each, or ``[1, n, n, …]`` with an independent first frame); a token of block i attends to the tokens of blocks ≤ i
  in self-attention. Cross-attention to the text is untouched.
- **Per-block timesteps.** Every frame carries its block's timestep. diffusers' Wan already takes a timestep per
  token (``(B, tokens)``, the Wan 2.2 TI2V layout), so ``frame_timesteps`` only expands ``(B, F)`` to tokens.

``BlockCausalWan(network)`` installs one ``BlockCausalProcessor`` on every self-attention and an offset-aware rotary
embedding, all driven by one ``CausalState``:

- ``with causal.masked(blocks):`` — the whole clip in one pass under the block-causal mask (training: teacher
  forcing, the rollout's exit steps, ODE regression);
- ``with causal.cached(cache, start_frame):`` — inference with a KV cache: the pass holds only the frames from
  ``start_frame`` on (one block), attends to the cache's earlier blocks and to itself, and, when the cache is
  ``writing`` (and the pass runs under no_grad: the context write), appends its own keys and values (after the
  rotary embedding, at their true frame positions). A ``window`` (in frames) keeps only the most recent context for
  long videos (a rolling cache).

The context managers only set what the rotary embedding hands the blocks (``CausalRope``), so gradient
checkpointing's recompute attends exactly as the forward did.

Outside both contexts the network is the plain bidirectional Wan (the teacher: the same weights, adapters off).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


def frame_blocks(num_frames: int, frames_per_block: int, *, independent_first_frame: bool = False
                 ) -> list[tuple[int, int]]:
    """``[(start, end), …]`` covering ``num_frames`` latent frames: ``frames_per_block`` frames each (``[1, n, n, …]``
    with ``independent_first_frame``); the last block may be shorter."""
    if num_frames < 1 or frames_per_block < 1:
        raise ValueError(f"frame_blocks: num_frames and frames_per_block must be at least 1 "
                         f"({num_frames}, {frames_per_block})")
    blocks, start = [], 0
    if independent_first_frame:
        blocks.append((0, 1))
        start = 1
    while start < num_frames:
        end = min(start + frames_per_block, num_frames)
        blocks.append((start, end))
        start = end
    return blocks


def block_mask(blocks: list[tuple[int, int]], tokens_per_frame: int, device=None) -> torch.Tensor:
    """``(L, L)`` bool, True where a query token may attend a key token: the key's block is not after the query's."""
    index = torch.cat([torch.full(((end - start) * tokens_per_frame,), i, dtype=torch.long)
                       for i, (start, end) in enumerate(blocks)]).to(device)
    return index[:, None] >= index[None, :]


def frame_timesteps(timesteps: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """``(B, F)`` per-frame timesteps → ``(B, F·tokens_per_frame)`` per-token, as diffusers' Wan takes them."""
    return timesteps.repeat_interleave(tokens_per_frame, dim=1)


@dataclass
class KVCache:
    """Self-attention keys and values of the blocks generated so far, per transformer layer.

    ``writing``: whether a pass appends its own keys and values (the context write after a block is finished: the
    block re-noised to ``context_noise`` and run once at that timestep). ``window``: the most recent frames kept
    (None: all); older frames are dropped as new ones arrive.

    Per layer the cache is a tuple of chunks, one per write (each ``(B, tokens, heads, dim)``), never one tensor
    rebuilt by concatenation: a pass that keeps the cache as it was (an exit pass whose backward recomputes it) holds
    the same chunks as the cache itself, so however many passes keep it, the keys and values are in memory once."""

    window: int | None = None
    writing: bool = False
    keys: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # layer → chunks
    values: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    frames: int = 0  # frames held
    tokens_per_frame: int = 0

    def clear(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.frames = 0

    def tokens(self) -> int:
        """Tokens held (per layer: every layer holds the same)."""
        return sum(chunk.shape[1] for chunk in next(iter(self.keys.values()), ()))


def _keep_last(chunks: tuple[torch.Tensor, ...], tokens: int | None) -> tuple[torch.Tensor, ...]:
    """The last ``tokens`` tokens of ``chunks`` (None: all), still as chunks (the first one kept may be a slice)."""
    if tokens is None:
        return chunks
    kept, held = [], 0
    for chunk in reversed(chunks):
        if held >= tokens:
            break
        take = min(chunk.shape[1], tokens - held)
        kept.append(chunk[:, -take:] if take < chunk.shape[1] else chunk)
        held += take
    return tuple(reversed(kept))


@dataclass
class CausalState:
    mode: str = "full"  # "full": plain bidirectional; "masked": block-causal mask; "cached": KV cache
    blocks: list[tuple[int, int]] | None = None
    tokens_per_frame: int = 0
    cache: KVCache | None = None
    start_frame: int = 0  # the first frame of a cached pass


class CausalRope(tuple):
    """Wan's rotary embedding ``(cos, sin)`` carrying what this pass's self-attention must do: ``mask`` (the
    block-causal mask) or the KV cache's ``past`` keys and values (per layer, as they were when the pass ran) and
    the ``cache`` to append to. It travels with the blocks' inputs, so a gradient-checkpointing recompute in the
    backward — long after the context manager has closed, and after later blocks have extended the cache — attends
    exactly as the forward did."""

    mask: torch.Tensor | None = None
    past: tuple[dict[int, tuple[torch.Tensor, ...]], dict[int, tuple[torch.Tensor, ...]]] | None = None
    cache: "KVCache | None" = None
    tokens_per_frame: int = 0


class BlockCausalProcessor:
    """The self-attention of one Wan block, with the mask or the cache its rotary embedding carries (``CausalRope``);
    Wan's own processor for a plain pass. Projections, norms and the rotary embedding are Wan's own
    (``attn.to_q`` …, ``attn.norm_q`` …), so adapters on them act as usual."""

    def __init__(self, layer: int, inner):
        self.layer, self.inner = layer, inner  # inner: the processor it replaces

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not isinstance(rotary_emb, CausalRope) or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        mask, keys, values = rotary_emb.mask, key, value
        if rotary_emb.past is not None:  # cached: earlier blocks from the cache, then this pass's own tokens
            past_k, past_v = rotary_emb.past[0].get(self.layer, ()), rotary_emb.past[1].get(self.layer, ())
            if past_k:
                keys, values = torch.cat([*past_k, key], dim=1), torch.cat([*past_v, value], dim=1)
            cache = rotary_emb.cache
            if cache is not None and cache.writing and not torch.is_grad_enabled():
                keep = None if cache.window is None else cache.window * rotary_emb.tokens_per_frame
                cache.keys[self.layer] = _keep_last((*past_k, key.detach()), keep)
                cache.values[self.layer] = _keep_last((*past_v, value.detach()), keep)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding (interleaved pairs), as its own processor applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class _CausalRopeModule(torch.nn.Module):
    """Wan's rotary embedding, as a ``CausalRope`` inside the causal contexts: the block-causal mask, or the cache at
    the true frame positions of a block generated alone (frames ``start_frame …``)."""

    def __init__(self, rope: torch.nn.Module, state: CausalState):
        super().__init__()
        self.rope, self.state = rope, state

    def forward(self, hidden_states: torch.Tensor):
        state = self.state
        if state.mode == "full":
            return self.rope(hidden_states)
        b, c, f, h, w = hidden_states.shape
        offset = state.start_frame if state.mode == "cached" else 0
        cos, sin = self.rope(hidden_states.new_empty((1, c, offset + f, h, w)) if offset else hidden_states)
        tokens = f // self.rope.patch_size[0] * (h // self.rope.patch_size[1]) * (w // self.rope.patch_size[2])
        out = CausalRope((cos[:, -tokens:], sin[:, -tokens:]))
        out.tokens_per_frame = state.tokens_per_frame
        if state.mode == "masked":
            out.mask = block_mask(state.blocks, state.tokens_per_frame, hidden_states.device)
        else:
            out.past = (dict(state.cache.keys), dict(state.cache.values))  # the chunks as they are now
            out.cache = state.cache
        return out


class BlockCausalWan:
    """Makes ``network`` (a ``WanTransformer3DModel``, adapters or not) switchable to block-causal attention."""

    def __init__(self, network: torch.nn.Module):
        self.network = network
        self.state = CausalState()
        cfg = network.config
        self.patch = tuple(cfg.patch_size)
        for layer, block in enumerate(network.blocks):
            block.attn1.set_processor(BlockCausalProcessor(layer, block.attn1.processor))
        network.rope = _CausalRopeModule(network.rope, self.state)

    frame_blocks = staticmethod(frame_blocks)

    @staticmethod
    def new_cache(window: int | None = None) -> KVCache:
        return KVCache(window=window)

    def tokens_per_frame(self, latents: torch.Tensor) -> int:
        _, _, _, h, w = latents.shape
        return (h // self.patch[1]) * (w // self.patch[2])

    @contextlib.contextmanager
    def masked(self, blocks: list[tuple[int, int]], tokens_per_frame: int):
        previous = (self.state.mode, self.state.blocks, self.state.tokens_per_frame)
        self.state.mode, self.state.blocks, self.state.tokens_per_frame = "masked", blocks, tokens_per_frame
        try:
            yield self
        finally:
            self.state.mode, self.state.blocks, self.state.tokens_per_frame = previous

    @contextlib.contextmanager
    def cached(self, cache: KVCache, start_frame: int, tokens_per_frame: int):
        """A pass over the frames from ``start_frame`` on, reading (and, when ``cache.writing``, extending) ``cache``.
        With a ``window``, ``start_frame`` is still the block's true position: only the cache is bounded."""
        previous = (self.state.mode, self.state.cache, self.state.start_frame, self.state.tokens_per_frame)
        self.state.mode, self.state.cache, self.state.start_frame = "cached", cache, start_frame
        self.state.tokens_per_frame = tokens_per_frame
        try:
            yield self
        finally:
            if cache.writing:
                cache.tokens_per_frame = tokens_per_frame
                cache.frames = cache.tokens() // tokens_per_frame
            self.state.mode, self.state.cache, self.state.start_frame, self.state.tokens_per_frame = previous


__all__ = ["BlockCausalProcessor", "BlockCausalWan", "CausalRope", "CausalState", "KVCache", "block_mask", "frame_blocks",
           "frame_timesteps"]
