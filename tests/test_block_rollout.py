"""Self-Forcing's block rollout (``block_backward_simulation``) on the real block-causal tiny Wan with its KV cache:
the exit draws, the no-grad structure (only exit steps inside the gradient window build a graph), the context
writes under no_grad, and that a block's output depends on the earlier blocks only through the cache."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from simpletuner_dmd.families.block_causal import BlockCausalWan, KVCache, frame_blocks, frame_timesteps
from simpletuner_dmd.flow import flow_to_x0
from simpletuner_dmd.method_toolkit import draw_block_exits
from simpletuner_dmd.methods.dmd.rollout import block_backward_simulation

STEPS = [1000, 757, 522]


def test_block_exits_follow_the_keys():
    g = torch.Generator().manual_seed(0)
    assert draw_block_exits(4, 3, last_step_only=True, same_step_across_blocks=False, generator=g) == [2] * 4
    same = draw_block_exits(5, 3, last_step_only=False, same_step_across_blocks=True, generator=g)
    assert len(set(same)) == 1 and 0 <= same[0] < 3
    draws = [tuple(draw_block_exits(5, 3, last_step_only=False, same_step_across_blocks=False,
                                    generator=torch.Generator().manual_seed(s))) for s in range(20)]
    assert any(len(set(d)) > 1 for d in draws)  # blocks exit at their own steps
    assert draw_block_exits(5, 3, last_step_only=False, same_step_across_blocks=False,
                            generator=torch.Generator().manual_seed(3)) == list(draws[3])  # same seed, same exits


@pytest.fixture(scope="module")
def student(tiny_wan):
    torch.manual_seed(0)
    network = WanTransformer3DModel.from_pretrained(tiny_wan / "transformer").train()
    return BlockCausalWan(network)


def _rollout(student, noise, exits, blocks, *, grad_from_frame, context_noise=0.0, record=None):
    tokens = student.tokens_per_frame(noise)
    cond = torch.ones((noise.shape[0], 8, 32))
    cache = KVCache()

    def run(x, t, start, end, writing):
        cache.writing = writing
        per_frame = t[:, None].expand(-1, end - start)
        with student.cached(cache, start, tokens):
            flow = student.network(x, timestep=frame_timesteps(per_frame, tokens), encoder_hidden_states=cond,
                                   return_dict=False)[0]
        if record is not None:
            record.append((start, float(t[0]), writing, torch.is_grad_enabled()))
        return flow_to_x0(x, flow, t)

    return block_backward_simulation(lambda x, t, s, e: run(x, t, s, e, False),
                                     lambda x, t, s, e: run(x, t, s, e, True), noise, STEPS, blocks, exits,
                                     grad_from_frame=grad_from_frame, context_noise=context_noise, with_grad=True)


def test_only_exit_steps_inside_the_gradient_window_build_a_graph(student):
    blocks = frame_blocks(5, 2, independent_first_frame=True)  # [0], [1, 2], [3, 4]
    noise = torch.randn((1, 16, 5, 4, 4), generator=torch.Generator().manual_seed(1))
    calls = []
    roll = _rollout(student, noise, [1, 2, 0], blocks, grad_from_frame=1, context_noise=100.0, record=calls)
    # block 0: steps 0, 1 (exit, outside the window: no grad), context write; block 1: 0, 1, 2 (exit, grad), write;
    # block 2: 0 (exit, grad), no write after the last block
    assert [(s, t, w, g) for s, t, w, g in calls] == [
        (0, 1000.0, False, False), (0, 757.0, False, False), (0, 100.0, True, False),
        (1, 1000.0, False, False), (1, 757.0, False, False), (1, 522.0, False, True), (1, 100.0, True, False),
        (3, 1000.0, False, True)]
    assert roll.grad_blocks == [1, 2] and roll.student_forwards == 6 and roll.context_writes == 2
    assert roll.x0.shape == noise.shape
    params = [p for p in student.network.parameters() if p.requires_grad]
    outside = torch.autograd.grad(roll.x0[:, :, :1].square().sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in outside)  # the block outside the window reaches no weight
    loss = roll.x0.square().mean()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.network.parameters())


def test_a_later_block_sees_the_earlier_ones_only_through_the_cache(student):
    blocks = frame_blocks(4, 2)
    noise = torch.randn((1, 16, 4, 4, 4), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    first = _rollout(student, noise, [2, 2], blocks, grad_from_frame=4).x0.detach()
    changed = noise.clone()
    changed[:, :, 2:] = torch.randn_like(changed[:, :, 2:])  # only the second block's noise
    torch.manual_seed(7)
    second = _rollout(student, changed, [2, 2], blocks, grad_from_frame=4).x0.detach()
    assert torch.allclose(first[:, :, :2], second[:, :, :2], atol=1e-6)  # the first block is causal
    assert not torch.allclose(first[:, :, 2:], second[:, :, 2:], atol=1e-3)
