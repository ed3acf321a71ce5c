"""The ``sd3`` family (Stable Diffusion 3/3.5): a tiny pipeline built offline, the packed condition against the stock
pipeline's ``encode_prompt``, the family's Euler sampler against the stock pipeline, LoRA files the stock pipeline
loads, and the image-only latent layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.families.sd3 import (
    SD3Components,
    SD3Family,
    pack_condition,
    unpack_condition,
)
from simpletuner_dmd.types import LoadingFamily
from tests.tiny_methods import stock_student_latents

PROMPTS = ["a cat", "a red dog on the beach"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return SD3Family.make_tiny(tmp_path_factory.mktemp("tiny-sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def loaded(tiny_sd3):
    family = SD3Family()
    network = family.load_network(str(tiny_sd3), dtype=torch.float32)
    components = family.load_components(str(tiny_sd3), text_encoder_path=None, dtype=torch.float32)
    return family, network, components


def _pipe(path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed=0, b=1):
    return torch.randn(b, 16, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_tiny_pipeline_reloads_offline_and_the_family_loads_it(tiny_sd3, loaded):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5Tokenizer,
    )

    pipe = _pipe(tiny_sd3)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert isinstance(pipe.tokenizer_3, T5Tokenizer) and pipe.tokenizer_max_length == 77
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae_scale_factor * pipe.patch_size == SD3Family.size_multiple

    family, network, components = loaded
    assert isinstance(family, LoadingFamily)
    assert isinstance(network, SD3Transformer2DModel) and not any(p.requires_grad for p in network.parameters())
    assert isinstance(components, SD3Components) and isinstance(components.vae, AutoencoderKL)
    assert isinstance(components.text_encoder, torch.nn.ModuleList)
    assert [type(m) for m in components.text_encoder] == [CLIPTextModelWithProjection, CLIPTextModelWithProjection,
                                                          T5EncoderModel]
    assert components.vae.dtype == torch.float32
    with pytest.raises(UserError, match="no transformer/"):
        family.load_network(str(tiny_sd3.parent), dtype=torch.float32)


def test_lora_targets_name_the_joint_attention_projections(loaded):
    _, network, _ = loaded
    leaves = {name.rsplit("attn.", 1)[-1] for name, _ in network.named_modules() if ".attn." in name}
    assert set(SD3Family.lora_target_modules) <= leaves


def test_encode_prompts_packs_exactly_what_the_pipeline_encodes(tiny_sd3, loaded):
    family, network, components = loaded
    cond = family.encode_prompts(components, PROMPTS)
    pooled_dim = network.config.pooled_projection_dim
    assert cond.shape == (2, 1 + 77 + 256, 48) and cond.dtype == torch.float32
    embeds, pooled = unpack_condition(cond, pooled_dim)
    with torch.no_grad():
        ref_embeds, _, ref_pooled, _ = _pipe(tiny_sd3).encode_prompt(PROMPTS, None, None, device="cpu",
                                                                     do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    assert torch.all(cond[:, 0, pooled_dim:] == 0)
    torch.testing.assert_close(pack_condition(ref_embeds, ref_pooled), cond, rtol=0, atol=0)
    assert family.encode_prompts(components, PROMPTS, max_length=16).shape == (2, 1 + 77 + 16, 48)


class _Wrapper(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_predict_flow_is_the_transformer_on_the_unpacked_condition(loaded):
    family, network, components = loaded
    cond = family.encode_prompts(components, PROMPTS)
    x, t = _noise(1, b=2), torch.tensor([999.0, 250.0])
    out = family.predict_flow(network, x, t, cond)
    assert out.shape == x.shape
    with torch.no_grad():
        ref = network(hidden_states=x[:, :, 0], encoder_hidden_states=cond[:, 1:], pooled_projections=cond[:, 0, :40],
                      timestep=t, return_dict=False)[0]
    torch.testing.assert_close(out[:, :, 0], ref, rtol=0, atol=0)
    wrapped = _Wrapper(network)  # as DDP holds the network: no config of its own
    torch.testing.assert_close(family.predict_flow(wrapped, x, t, cond), out, rtol=0, atol=0)
    assert family.concat_conditions([cond, cond]).shape[0] == 4
    assert family.repeat_condition(cond[:1], 3).shape == (3, *cond.shape[1:])


def test_euler_sampler_and_decode_equal_the_stock_pipeline(tiny_sd3, loaded):
    """4 steps, guidance 3, a negative prompt: the stock pipeline given the family's σ grid (its scheduler shifts
    ``linspace(1, 0, 5)[:-1]`` by its own shift 3.0) samples what the family's sampler samples."""
    family, network, components = loaded
    pipe = _pipe(tiny_sd3)
    noise = _noise(2)
    cond = family.encode_prompts(components, [PROMPTS[0]])
    uncond = family.encode_prompts(components, ["blurry"])
    ours = family.euler_sampler(network, steps=4, shift=3.0)(noise, cond, uncond, 3.0, None)
    call = dict(prompt=PROMPTS[0], negative_prompt="blurry", num_inference_steps=4, guidance_scale=3.0,
                latents=noise[:, :, 0], sigmas=np.linspace(1.0, 0.0, 5)[:-1].tolist(), height=64, width=64)
    with torch.no_grad():
        stock = pipe(output_type="latent", **call).images
        pixels = pipe(output_type="pt", **call).images
    torch.testing.assert_close(ours[:, :, 0], stock, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(family.decode_latents(components, ours)[:, :, 0], pixels, rtol=1e-4, atol=1e-5)
    # the stock scheduler's default 4-step grid is another one (linspace from 1 to its σ_min, then shifted)
    pipe.scheduler.set_timesteps(4)
    assert not torch.allclose(pipe.scheduler.sigmas[1:4], torch.tensor([0.9, 0.75, 0.5]), atol=1e-3)


def _lora_network(tiny_sd3, *, r=4, alpha=8):
    from peft import LoraConfig

    family = SD3Family()
    network = family.load_network(str(tiny_sd3), dtype=torch.float32)
    torch.manual_seed(3)
    network.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                                   target_modules=list(SD3Family.lora_target_modules)))
    return family, network


def _flows(family, network, cond):
    x, t = _noise(4, b=2), torch.tensor([900.0, 300.0])
    with torch.no_grad():
        return family.predict_flow(network, x, t, cond)


def test_saved_lora_loads_into_the_stock_pipeline(tiny_sd3, loaded, tmp_path):
    from peft.utils import get_peft_model_state_dict

    _, base, components = loaded
    family, network = _lora_network(tiny_sd3)
    state = get_peft_model_state_dict(network)
    assert any(".attn2.to_q." in k for k in state) and any(".add_q_proj." in k for k in state)
    cond = family.encode_prompts(components, PROMPTS)
    expected = _flows(family, network, cond)
    assert not torch.allclose(expected, _flows(family, base, cond), atol=1e-3)  # the adapter changes the output

    path = family.save_lora(state, tmp_path, network.peft_config["default"])
    assert path == tmp_path / "pytorch_lora_weights.safetensors" and path.is_file()
    pipe = _pipe(tiny_sd3)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_flows(family, pipe.transformer, cond), expected, rtol=1e-5, atol=1e-5)


def test_comfyui_file_loads_into_the_stock_pipeline_with_the_scale_folded_in(tiny_sd3, loaded, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    _, _, components = loaded
    family, network = _lora_network(tiny_sd3, r=4, alpha=2)
    state = get_peft_model_state_dict(network)
    original = family.original_lora_state(state, network.peft_config["default"])
    assert all(k.startswith("transformer.transformer_blocks.") for k in original)
    assert not any("alpha" in k for k in original)
    key = next(k for k in state if ".lora_B." in k)
    torch.testing.assert_close(original[f"transformer.{key}"], state[key] * 0.5)
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "sd3_lora.safetensors"),
              metadata={"format": "pt"})
    cond = family.encode_prompts(components, PROMPTS[:1] * 2)
    pipe = _pipe(tiny_sd3)
    pipe.load_lora_weights(str(tmp_path), weight_name="sd3_lora.safetensors")
    torch.testing.assert_close(_flows(family, pipe.transformer, cond), _flows(family, network, cond),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pos_embed.proj"):
        family.original_lora_state({"pos_embed.proj.lora_A.weight": torch.zeros(4, 16)},
                                   network.peft_config["default"])


def test_image_layout_round_trip_and_frames_refused(loaded):
    family, _, components = loaded
    assert family.frame_axis() == 2
    assert family.latent_shape(components, width=64, height=32, frames=1) == (16, 1, 4, 8)
    pixels = torch.rand(2, 3, 1, 32, 64) * 2 - 1
    latents = family.encode_pixels(components, pixels)
    assert latents.shape == (2, 16, 1, 4, 8)
    vae = components.vae
    raw = vae.encode(pixels[:, :, 0]).latent_dist.mode()
    torch.testing.assert_close(latents[:, :, 0], (raw - vae.config.shift_factor) * vae.config.scaling_factor)
    decoded = family.decode_latents(components, latents)
    assert decoded.shape == (2, 3, 1, 32, 64) and decoded.min() >= 0 and decoded.max() <= 1
    with pytest.raises(UserError, match="image-only"):
        family.latent_shape(components, width=64, height=64, frames=5)
    with pytest.raises(UserError, match="image-only"):
        family.encode_pixels(components, torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(UserError, match="image-only"):
        family.decode_latents(components, torch.zeros(1, 16, 2, 4, 4))


def test_text_encoders_move_and_quantize_as_one_module(tiny_sd3):
    pytest.importorskip("optimum.quanto")
    from simpletuner_dmd.hosts.reference.trainer import quantize_frozen

    family = SD3Family()
    components = family.load_components(str(tiny_sd3), text_encoder_path=str(tiny_sd3), dtype=torch.float32)
    before = family.encode_prompts(components, PROMPTS)
    quantize_frozen(components.text_encoder, "int8-quanto", "text encoder")
    components.text_encoder.to("cpu")
    after = family.encode_prompts(components, PROMPTS)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.equal(after, before)  # the int8 weights were used


def test_registers_itself():
    from simpletuner_dmd.families import sd3

    registered = []
    sd3.register_model_families(registered.append)
    assert registered == [SD3Family]
    assert SD3Family.name == "sd3" and SD3Family.pipeline_class == "StableDiffusion3Pipeline"


def test_config_refuses_video_validation_and_estimate_counts_the_network(tiny_sd3):
    import json

    from simpletuner_dmd.estimate import count_parameters

    assert SD3Family.config_problems({"validation_num_video_frames": 1}) == []
    assert "image-only" in SD3Family.config_problems({"validation_num_video_frames": 5})[0]
    config = json.loads((tiny_sd3 / "transformer" / "config.json").read_text())
    counts = count_parameters(SD3Family(), config, SD3Family.lora_target_modules, rank=4)
    real = SD3Family().load_network(str(tiny_sd3), dtype=torch.float32)
    assert counts["total"] == sum(p.numel() for p in real.parameters()) and counts["lora_per_rank"] > 0
    shape = SD3Family.activation_shape(config, width=64, height=64, frames=1)
    assert shape == {"tokens": 16 + 77 + 256, "hidden": 16, "ffn": 64, "blocks": 2}


def test_one_dmd_step_with_the_gan_term_runs_on_the_family(tiny_sd3, loaded):
    """DMD (with DMD2's GAN head on ``gan_feature_module``) set up on the tiny SD3 as the reference host does it: the
    student's loss back-propagates into its LoRA only, and the critic's turn runs."""
    from accelerate import Accelerator

    from simpletuner_dmd.hosts.reference import trainer as T
    from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA
    from simpletuner_dmd.methods.dmd.method import DMD
    from simpletuner_dmd.types import Batch, RunContext, StepInfo

    family, _, components = loaded
    cfg = {**HOST_SCHEMA.defaults(), "pretrained_model_name_or_path": str(tiny_sd3)}
    m_cfg, problems, _ = DMD.schema.validate({"dmd_denoising_steps": "1000,500", "gan_loss_weight": 0.1},
                                             prefix="distillation_config")
    assert not problems, problems
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    new_network = lambda: T.frozen_base(cfg, family, torch.float32)  # noqa: E731
    models = T.build_models(cfg, family, accelerator, distilling=True, new_network=new_network)
    method = DMD(m_cfg)
    encode = lambda texts: family.encode_prompts(components, texts, max_length=16)  # noqa: E731
    method.distill_setup(run=RunContext(
        host_config=cfg, method_config=m_cfg, family=family, student=models.network, accelerator=accelerator,
        encode_prompts=encode, negative_prompt="blurry", output_dir=None, model_type="lora",
        student_adapter=T.STUDENT_ADAPTER, load_base=new_network, teacher=None))
    batch = Batch(latents=_noise(5, b=2), cond=encode(PROMPTS), captions=PROMPTS)
    step = StepInfo(0, 0, 1, True, torch.Generator().manual_seed(123))
    loss = method.distill_loss(batch=batch, step=step, host_loss=lambda: None)
    assert any("gan" in k for k in loss.logs), loss.logs  # the GAN term ran on the family's features
    loss.loss.backward()
    grads = {n for n, p in models.network.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(f".{T.STUDENT_ADAPTER}." in n for n in grads)
    method.distill_after_optimizer_step(step=step)
    assert all(np.isfinite(v) for v in method.distill_metrics(step=step).values())


# --------------------------------------------------------------------------- end to end through the reference host


@pytest.fixture()
def sd3_job(tmp_path, tiny_sd3, tiny_dataset):
    """The keyed example config (dmd, lcm, dcm) on the tiny SD3 and the tiny dataset's images; returns a writer of
    overrides."""
    import json
    import shutil

    from tests.conftest import REPO

    shutil.copytree(tiny_dataset, tmp_path / "data")
    config = json.loads((REPO / "config_examples/tiny-wan-methods/config.json").read_text())
    backends = json.loads((REPO / config["data_backend_config"]).read_text())
    for b in backends:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(tmp_path / "data")
        b["cache_dir"] = str(tmp_path / "cache" / b["id"])
    (tmp_path / "backends.json").write_text(json.dumps(backends))
    images_only = [{**b, "disabled": True} if b["dataset_type"] == "video" else b for b in backends]
    (tmp_path / "images.json").write_text(json.dumps(images_only))
    config.update(model_family="sd3", pretrained_model_name_or_path=str(tiny_sd3),
                  pretrained_t5_model_name_or_path=str(tiny_sd3), data_backend_config=str(tmp_path / "images.json"),
                  output_dir=str(tmp_path / "out"), report_to="none", validation_num_video_frames=1,
                  validation_resolution="32x32", base_model_precision="no_change", mixed_precision="no",
                  optimizer="adamw", use_ema=False, validation_guidance=1.0, validation_seed=7, lr_warmup_steps=0,
                  learning_rate=1e-2, checkpoint_step_interval=1, validation_step_interval=0)

    def write(**overrides):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**config, **overrides}))
        return path

    return write, tmp_path


def test_a_video_dataset_or_frame_count_is_refused_for_the_image_family(sd3_job):
    from simpletuner_dmd.errors import ConfigError
    from simpletuner_dmd.hosts.reference.run_config import load_config
    from simpletuner_dmd.plugins import get_plugin_manager

    write, root = sd3_job
    with pytest.raises(ConfigError, match="'tiny-digits' is a video dataset, but the sd3 family makes images only"):
        load_config(write(data_backend_config=str(root / "backends.json")), get_plugin_manager())
    with pytest.raises(ConfigError, match="validation_num_video_frames"):
        load_config(write(validation_num_video_frames=5), get_plugin_manager())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dmd", "lcm", "dcm"])
def test_each_method_trains_resumes_exports_and_runs_in_the_stock_pipeline(sd3_job, tiny_sd3, method, capsys):
    """Train one step (checkpoint), resume for a second, export; the stock ``StableDiffusion3Pipeline`` loads the LoRA
    and the method's scheduler and reproduces the reference host's validation sample of the student (DCM: runs)."""
    import json

    from safetensors.torch import load_file

    from simpletuner_dmd.hosts.reference.trainer import train

    write, root = sd3_job
    train(write(distillation_method=method, max_train_steps=1))
    out = train(write(distillation_method=method, max_train_steps=2))
    log = capsys.readouterr().out
    assert "family: sd3" in log and "resumed from" in log
    info = json.loads((out / "simpletuner_dmd.json").read_text())
    assert info["family"] == "sd3" and (out / "scheduler").is_dir() and (out / info["original_lora"]).is_file()
    assert "image = pipe(" in (out / "README.md").read_text()

    expected = load_file(str(out / "validation" / "step-2" / "validation" / "student" / "latents.safetensors"))
    pipe = _pipe(str(tiny_sd3))
    pipe.load_lora_weights(str(out))
    assert info["steps"] == len(json.loads((out / "scheduler" / "scheduler_config.json").read_text())[
        "few_step_timesteps"])
    latents = stock_student_latents(pipe, out, info["validation_prompt"], 7, width=32, height=32)
    assert latents.unsqueeze(2).shape == expected["latents"].shape and torch.isfinite(latents).all()
    if method == "dmd":  # the model card's code, and `sample` beside the teacher, on an image pipeline
        import re

        from PIL import Image

        from simpletuner_dmd.cli import main

        card = (out / "README.md").read_text()
        code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/this/folder", str(out))
        scope: dict = {}
        exec(compile(code, "model-card", "exec"), scope)  # noqa: S102 — the card's own example, on the tiny model
        assert scope["image"].size == (32, 32)
        samples = root / "samples"
        assert main(["sample", "--base", str(tiny_sd3), "--student", str(out), "--out", str(samples), "--seeds", "7",
                     "--teacher-steps", "2"]) == 0
        ours = np.asarray(Image.open(samples / "validation" / "seed-7" / "student" / "frame-000.png"), dtype=np.int16)
        theirs = out / "validation" / "step-2" / "validation" / "student" / "frame-000.png"
        assert np.abs(ours - np.asarray(Image.open(theirs), dtype=np.int16)).max() <= 1
    if method != "dcm":  # DCM's fine mode also switches to its detail expert at low noise, which a stock pipeline
        # does not (docs/using-the-student.md); its discriminator read the joint blocks' image tokens above
        torch.testing.assert_close(latents.unsqueeze(2), expected["latents"], rtol=1e-4, atol=1e-4)
