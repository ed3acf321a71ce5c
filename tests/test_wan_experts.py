"""The ``wan2.2`` family (Wan 2.2 A14B's two experts): per-sample routing by WanPipeline's boundary rule, a DMD step
whose exit step and critic timestep fall on different sides, one LoRA file per expert that the stock pipeline loads,
and the family end to end through the reference host (train, checkpoint, resume, export, stock-pipeline sample)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.families.wan_experts import SECOND_FILE, WanExperts, WanExpertsFamily
from simpletuner_dmd.hosts.reference import trainer as T
from simpletuner_dmd.methods.dmd.method import DMD
from tests.tiny_methods import batch, build_method, perturb_adapters, step_info, stock_student_latents


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory):
    return WanExpertsFamily.make_tiny(tmp_path_factory.mktemp("tiny-experts") / "tiny-wan22")


def test_each_sample_runs_the_expert_its_timestep_selects(tiny_experts):
    network = WanExpertsFamily().load_network(str(tiny_experts), dtype=torch.float32)
    assert isinstance(network, WanExperts) and network.boundary_timestep == 875.0
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(4, 16, 2, 4, 4, generator=g), torch.randn(4, 8, 32, generator=g)
    t = torch.tensor([999.0, 875.0, 874.9, 20.0])  # >= boundary: transformer (as WanPipeline); below: transformer_2
    out = WanExpertsFamily().predict_flow(network, x, t, cond)
    with torch.no_grad():
        for i, expert in enumerate([network.transformer, network.transformer, network.transformer_2,
                                    network.transformer_2]):
            alone = expert(hidden_states=x[i:i + 1], timestep=t[i:i + 1], encoder_hidden_states=cond[i:i + 1],
                           return_dict=False)[0]
            torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    high, low = network.transformer, network.transformer_2
    assert not torch.allclose(high(hidden_states=x[:1], timestep=t[:1], encoder_hidden_states=cond[:1])[0],
                              low(hidden_states=x[:1], timestep=t[:1], encoder_hidden_states=cond[:1])[0])


def test_dmd_exit_step_and_critic_on_different_experts(tiny_experts):
    """Exit at t = 1000 (high-noise expert), critic timesteps in [20, 500] (low-noise expert): the student's gradient
    reaches only its transformer LoRA, and the fake score learns only on transformer_2 — each network call went to the
    expert its own timestep selects."""
    cfg = {"dmd_denoising_steps": "1000", "min_timestep_ratio": 0.02, "max_timestep_ratio": 0.5,
           "generator_update_interval": 1, "real_score_guidance_scale": 3.0}
    built = build_method(tiny_experts, DMD, cfg, family=WanExpertsFamily(),
                         host={"base_model_precision": "no_change"})
    network = built.models.network
    perturb_adapters(network)
    calls = []
    hooks = [getattr(network, name).register_forward_pre_hook(
        lambda _m, _a, kw, name=name: calls.append((name, torch.is_grad_enabled(), kw["timestep"].tolist())),
        with_kwargs=True) for name in ("transformer", "transformer_2")]
    before = {n: p.detach().clone() for n, p in network.named_parameters() if ".lora_" in n}
    loss = built.method.distill_loss(batch(b=2), step_info(0), lambda: None)
    loss.loss.backward()
    for name, grad_on, timesteps in calls:
        assert all((t >= 875) == (name == "transformer") for t in timesteps), calls
    assert any(name == "transformer" and grad_on for name, grad_on, _ in calls)  # the exit step, with a graph
    student = {n: p for n, p in network.named_parameters() if ".lora_" in n and ".student." in n}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.items()
               if n.startswith("transformer.") and ".lora_B." in n)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in student.items() if n.startswith("transformer_2."))
    built.optimizer.zero_grad()
    built.method.distill_after_optimizer_step(step_info(0))
    for hook in hooks:
        hook.remove()
    fake_changed = {n.split(".")[0] for n, p in network.named_parameters()
                    if ".lora_" in n and ".student." not in n and not torch.equal(p, before[n])}
    assert fake_changed == {"transformer_2"}


def test_one_lora_file_per_expert_round_trips_and_loads_into_the_stock_pipeline(tiny_experts, tmp_path):
    from diffusers import WanPipeline

    built = build_method(tiny_experts, DMD, {"dmd_denoising_steps": "1000,757,522"}, family=WanExpertsFamily(),
                         host={"base_model_precision": "no_change"})
    network, family = built.models.network, built.family
    perturb_adapters(network, seed=5)
    state = T._peft_state(network)
    family.save_lora(state, tmp_path, network.peft_config[T.STUDENT_ADAPTER])
    high, low = load_file(str(tmp_path / "pytorch_lora_weights.safetensors")), load_file(str(tmp_path / SECOND_FILE))
    assert all(k.startswith("transformer.blocks.") for k in [*high, *low]) and len(high) == len(low) == len(state) // 2
    back = family.read_lora(tmp_path)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    perturb_adapters(network, seed=9)  # the host's init_lora loads both files back into the student adapter
    assert "loaded" in T.load_student_lora(network, tmp_path, family)
    assert all(torch.equal(v, state[k]) for k, v in T._peft_state(network).items())

    pipe = WanPipeline.from_pretrained(str(tiny_experts))
    family.load_lora_into_pipeline(pipe, tmp_path, adapter_name="student")
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        ours = family.predict_flow(network, x, t, cond)
        stock = torch.cat([pipe.transformer(hidden_states=x[:1], timestep=t[:1], encoder_hidden_states=cond[:1])[0],
                           pipe.transformer_2(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=cond[1:])[0]])
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


def test_a_one_transformer_folder_and_model_type_full_are_refused(tiny_wan, job):
    with pytest.raises(UserError, match="not a two-expert Wan 2.2 pipeline"):
        WanExpertsFamily().load_network(str(tiny_wan), dtype=torch.float32)
    from simpletuner_dmd.errors import ConfigError
    from simpletuner_dmd.hosts.reference.run_config import load_config
    from simpletuner_dmd.plugins import get_plugin_manager

    with pytest.raises(ConfigError, match="model_type: full is not supported by the wan2.2 family"):
        load_config(job(model_family="wan2.2", model_type="full"), get_plugin_manager(), check_paths=False)


@pytest.mark.slow
def test_wan22_trains_checkpoints_resumes_exports_and_samples_in_the_stock_pipeline(job, tiny_experts, capsys):
    from diffusers import WanPipeline


    common = dict(model_family="wan2.2", pretrained_model_name_or_path=str(tiny_experts),
                  pretrained_t5_model_name_or_path=str(tiny_experts), checkpoint_step_interval=1,
                  validation_step_interval=0, base_model_precision="no_change", mixed_precision="no",
                  optimizer="adamw", use_ema=True, ema_update_interval=1, ema_validation="comparison",
                  validation_guidance=1.0, validation_seed=7, learning_rate=1e-2, lr_warmup_steps=0,
                  boundary_ratio=0.7)  # the host's override: 757 now runs the high-noise expert (0.875: the low)
    out = T.train(job(max_train_steps=1, **common))
    assert (out / "checkpoint-1").is_dir() and "family: wan2.2" in capsys.readouterr().out
    out = T.train(job(max_train_steps=2, **common))
    log = capsys.readouterr().out
    assert "resumed from" in log
    for folder in (out, out / "ema"):
        assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / SECOND_FILE).is_file()
    info = json.loads((out / "simpletuner_dmd.json").read_text())
    assert info["family"] == "wan2.2"
    assert [n.rsplit("_", 2)[-2:] for n in info["original_lora_files"]] == [["high", "noise.safetensors"],
                                                                            ["low", "noise.safetensors"]]
    card = (out / "README.md").read_text()
    assert "load_into_transformer_2=True" in card and "high_noise" in card

    # the stock pipeline with both experts' LoRAs, the saved scheduler and the run's boundary (the card's line)
    # reproduces the validation sample (the schedule 1000, 757, 522 crosses the boundary at 700: the first two steps
    # run transformer, the last transformer_2); at the folder's own 0.875 it does not
    expected = load_file(str(out / "validation" / "step-2" / "validation" / "student" / "latents.safetensors"))
    assert info["boundary_ratio"] == 0.7 and "pipe.register_to_config(boundary_ratio=0.7)" in card
    pipe = WanPipeline.from_pretrained(str(tiny_experts))
    WanExpertsFamily().load_lora_into_pipeline(pipe, out, adapter_name="student")
    folder_boundary = stock_student_latents(pipe, out, info["validation_prompt"], 7, width=32, height=32,
                                            num_frames=5)
    assert not torch.allclose(folder_boundary, expected["latents"], rtol=1e-3, atol=1e-3)
    pipe.register_to_config(boundary_ratio=0.7)
    latents = stock_student_latents(pipe, out, info["validation_prompt"], 7, width=32, height=32, num_frames=5)
    torch.testing.assert_close(latents, expected["latents"], rtol=1e-4, atol=1e-4)

    # the original (ComfyUI) layout, one file per expert, converts on load into the same two adapters
    original = WanPipeline.from_pretrained(str(tiny_experts))
    high, low = info["original_lora_files"]
    original.load_lora_weights(str(out), weight_name=high, adapter_name="student")
    original.load_lora_weights(str(out), weight_name=low, adapter_name="student", load_into_transformer_2=True)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        for expert in ("transformer", "transformer_2"):
            a, b = (getattr(p, expert)(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=cond,
                                       return_dict=False)[0] for p in (pipe, original))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # (an expert learns only on steps whose exit timestep falls on its side: after two steps one of them may not
    # have moved yet; the comparison above is not vacuous as long as one has)
    moved = [name for name, file in zip(("transformer", "transformer_2"), ("pytorch_lora_weights.safetensors",
                                                                           SECOND_FILE))
             if any(v.abs().sum() > 0 for k, v in load_file(str(out / file)).items() if "lora_B" in k)]
    assert moved, "neither expert's LoRA moved"

    # the model card's code runs, and `sample` loads both experts' LoRAs and reproduces the validation frames
    import re

    import numpy as np
    from PIL import Image

    from simpletuner_dmd.cli import main

    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/this/folder", str(out))
    scope: dict = {}
    exec(compile(code, "model-card", "exec"), scope)  # noqa: S102 — the card's own example, on the tiny model
    assert scope["frames"].shape == (5, 32, 32, 3)
    samples = out.parent / "samples"
    assert main(["sample", "--base", str(tiny_experts), "--student", str(out), "--out", str(samples), "--seeds", "7",
                 "--teacher-steps", "2"]) == 0
    ours, theirs = samples / "validation" / "seed-7" / "student", out / "validation" / "step-2" / "validation" / "student"
    assert (samples / "validation" / "sheet.png").is_file()
    for i in range(5):
        a = np.asarray(Image.open(ours / f"frame-{i:03d}.png"), dtype=np.int16)
        assert np.abs(a - np.asarray(Image.open(theirs / f"frame-{i:03d}.png"), dtype=np.int16)).max() <= 1


def test_both_experts_quantize_to_int8_and_a_dmd_step_trains_the_student(tiny_experts):
    """The frozen base of each expert in int8 (optimum-quanto, the host's base_model_precision), the adapters in fp32:
    a DMD step gives the student a finite, non-zero gradient."""
    from optimum.quanto import QModuleMixin

    built = build_method(tiny_experts, DMD, {"dmd_denoising_steps": "1000,757,522", "generator_update_interval": 1},
                         family=WanExpertsFamily(), host={"base_model_precision": "int8-quanto"})
    network = built.models.network
    for expert in (network.transformer, network.transformer_2):
        assert any(isinstance(m, QModuleMixin) for m in expert.modules())
    loss = built.method.distill_loss(batch(b=2), step_info(1), lambda: None)
    loss.loss.backward()
    grads = [p.grad for n, p in network.named_parameters() if ".student." in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_feature_reading_terms_are_refused_by_name(tiny_experts):
    """DMD2's GAN classifier and DCM's fine-mode discriminator read one network's features; a wan2.2 call may run
    either expert, so both refuse at set-up, naming the family (nothing trains on half the features)."""
    from simpletuner_dmd.methods.dcm.method import DCM

    with pytest.raises(UserError, match="'wan2.2' family does not name"):
        build_method(tiny_experts, DMD, {"gan_loss_weight": 0.1}, family=WanExpertsFamily(),
                     host={"base_model_precision": "no_change"})
    with pytest.raises(UserError, match="'wan2.2' family runs different sub-networks"):
        build_method(tiny_experts, DCM, {"mode": "fine", "multiphase": 2}, family=WanExpertsFamily(),
                     host={"base_model_precision": "no_change"})
