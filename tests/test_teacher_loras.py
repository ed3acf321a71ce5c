"""Distil your own model (issue 30): the user's LoRAs merged into the frozen base are what stock diffusers gives for
base + LoRA, in either file layout; a LoRA that does not fit is one line naming its key; and the combined LoRA that the
export writes reproduces the run's validation sample on the stock base alone, in the stock pipeline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from simpletuner_dmd.errors import ConfigError, UserError
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.teacher_loras import (LoraDelta, combined_lora, merge_teacher_loras, parse_teacher_loras,
                                           read_teacher_loras)

# the user's LoRA touches modules the student's does not (the feed-forward layers) and leaves some of the student's
# (to_v, to_out.0) alone; its rank and alpha differ from the student's
USER_TARGETS = ["to_q", "to_k", "ffn.net.0.proj", "ffn.net.2"]


def _user_lora(folder: Path, model: Path, *, rank=4, alpha=2.0, seed=0, targets=USER_TARGETS, network=None,
               std: float = 0.2, family=None) -> dict[str, Path]:
    """A random user LoRA for the tiny model's transformer (Wan unless ``family``) in ``folder``: ``diffusers``
    (``save_lora``, rank and alpha in its metadata) and ``original`` (the family's original layout) files of the same
    weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = family or WanFamily()
    if network is None:
        network = family.load_network(str(model), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    network.add_adapter(config, adapter_name="user")
    g = torch.Generator().manual_seed(seed)
    for name, p in network.named_parameters():
        if ".lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * std
    state = get_peft_model_state_dict(network, adapter_name="user")
    folder.mkdir(parents=True, exist_ok=True)
    family.save_lora(state, folder, config)
    save_file(family.original_lora_state(state, config), str(folder / "original.safetensors"))
    return {"diffusers": folder / "pytorch_lora_weights.safetensors", "original": folder / "original.safetensors"}


def _call(transformer):
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([700.0, 150.0]), encoder_hidden_states=cond,
                           return_dict=False)[0]


@pytest.fixture(scope="module")
def user_lora(tmp_path_factory, tiny_wan):
    return _user_lora(tmp_path_factory.mktemp("user-lora"), tiny_wan)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_the_merged_base_is_stock_diffusers_base_plus_the_lora(user_lora, tiny_wan, layout):
    from diffusers import WanPipeline

    family = WanFamily()
    merged = family.load_network(str(tiny_wan), dtype=torch.float32)
    base = _call(merged)
    lines = merge_teacher_loras(merged, family, [{"path": str(user_lora[layout]), "scale": 0.7,
                                                  "into": "transformer"}])
    assert lines == [f"teacher_loras: merged {user_lora[layout]} (scale 0.7, 12 modules of transformer) into the "
                     "frozen base"]

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    pipe.load_lora_weights(str(user_lora["diffusers"]), adapter_name="user")
    pipe.set_adapters(["user"], adapter_weights=[0.7])
    expected = _call(pipe.transformer)
    got = _call(merged)
    assert not torch.allclose(expected, base, atol=1e-3)  # the LoRA changes the teacher
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_sd3_merges_as_stock_diffusers_fuses(tmp_path, layout):
    """SD3 (another family, another pipeline class): the merged weights are diffusers' own fuse of the LoRA."""
    from diffusers import StableDiffusion3Pipeline

    from simpletuner_dmd.families.sd3 import SD3Family

    family = SD3Family()
    model = SD3Family.make_tiny(tmp_path / "tiny-sd3")
    user = _user_lora(tmp_path / "user", model, family=family, targets=["to_q", "add_k_proj", "ff.net.0.proj"])
    merged = family.load_network(str(model), dtype=torch.float32)
    merge_teacher_loras(merged, family, [{"path": str(user[layout]), "scale": 0.6, "into": "transformer"}])
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model))
    stock = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(user["diffusers"]), adapter_name="user")
    pipe.fuse_lora(lora_scale=0.6, adapter_names=["user"])
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, stock[k])]
    assert changed and all(".to_q." in k or ".add_k_proj." in k or ".ff.net.0.proj." in k for k in changed)
    assert all(torch.allclose(merged.state_dict()[k], fused[k], atol=1e-6, rtol=0) for k in stock)


def test_the_merge_comes_before_the_int8_quantization(tiny_wan, user_lora):
    """``build_models`` quantizes the base that ``frozen_base`` merged (int8 of the merged weight, not of the base)."""
    from types import SimpleNamespace

    from simpletuner_dmd.hosts.reference.trainer import build_models, frozen_base

    family = WanFamily()
    host = {"pretrained_model_name_or_path": str(tiny_wan), "quantize_via": "cpu", "model_type": "lora",
            "base_model_precision": "int8-quanto", "lora_rank": 4, "lora_alpha": 4, "lora_dropout": 0.0,
            "init_lora": None, "gradient_checkpointing": False,
            "teacher_loras": [{"path": str(user_lora["diffusers"]), "scale": 1.0, "into": "transformer"}]}
    models = build_models(host, family, SimpleNamespace(device=torch.device("cpu")),
                          new_network=lambda: frozen_base(host, family, torch.float32), distilling=True)
    plain = family.load_network(str(tiny_wan), dtype=torch.float32)
    merged = frozen_base(host, family, torch.float32)
    name = "blocks.0.ffn.net.0.proj"  # a module the user's LoRA touches and the student's does not
    quantized = models.network.get_submodule(name)
    assert type(quantized).__module__.startswith("optimum.quanto")
    weight = quantized.qweight.dequantize() if hasattr(quantized, "qweight") else quantized.weight.dequantize()
    to_merged = (weight - merged.get_submodule(name).weight).abs().max()
    to_plain = (weight - plain.get_submodule(name).weight).abs().max()
    assert to_merged < to_plain / 4, (to_merged, to_plain)


def test_a_lora_that_does_not_fit_is_one_line_naming_its_first_key(tmp_path, user_lora, tiny_wan):
    family = WanFamily()
    state = load_file(str(user_lora["diffusers"]))
    key = sorted(k for k in state if k.endswith("lora_A.weight"))[0]  # transformer.blocks.0.attn1.to_k.lora_A…
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)  # made for a wider model
    save_file(state, str(tmp_path / "wider.safetensors"))
    network = family.load_network(str(tiny_wan), dtype=torch.float32)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(UserError) as err:
        merge_teacher_loras(network, family, [{"path": str(tmp_path / "wider.safetensors"), "scale": 1.0,
                                               "into": "transformer"}])
    message = str(err.value)
    assert "\n" not in message and "does not fit the wan base" in message
    assert key.removeprefix("transformer.") in message and "(out x in)" in message
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())  # nothing merged

    state = load_file(str(user_lora["diffusers"]))
    state["transformer.blocks.9.attn1.to_q.lora_A.weight"] = state[key].clone()  # a block the tiny model lacks
    state["transformer.blocks.9.attn1.to_q.lora_B.weight"] = state[key.replace("lora_A", "lora_B")].clone()
    save_file(state, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(UserError, match=r"blocks\.9\.attn1\.to_q\.lora_A\.weight: the base has no such module"):
        merge_teacher_loras(network, family, [{"path": str(tmp_path / "deeper.safetensors"), "scale": 1.0,
                                               "into": "transformer"}])


def test_the_key_takes_paths_and_scales_and_validate_config_refuses_bad_entries(tmp_path, job):
    assert parse_teacher_loras("a.safetensors") == [{"path": "a.safetensors", "scale": 1.0, "into": "transformer"}]
    assert parse_teacher_loras([{"path": "a", "scale": 0.5}, "b"]) == [
        {"path": "a", "scale": 0.5, "into": "transformer"}, {"path": "b", "scale": 1.0, "into": "transformer"}]
    from simpletuner_dmd.hosts.reference.run_config import load_config
    from simpletuner_dmd.plugins import get_plugin_manager

    pm = get_plugin_manager()
    cases = {
        "[0].scale: must be a finite number": [{"path": "x", "scale": "strong"}],
        "[0]: unknown key 'weight'": [{"path": "x", "weight": 1}],
        f"teacher_loras[0].path: file not found: {tmp_path / 'missing.safetensors'}":
            [str(tmp_path / "missing.safetensors")],
        "teacher_loras[0].into: the wan family's LoRAs go into 'transformer', got 'transformer_2'":
            [{"path": "x", "into": "transformer_2"}],
    }
    for expected, value in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(job(teacher_loras=value), pm)
        assert any(expected in line for line in err.value.problems), err.value.problems


def test_combined_lora_is_the_exact_sum_of_its_sources():
    """Differing ranks and alphas, modules only one source touches: one rank, scale 1, the same delta everywhere."""
    from peft import LoraConfig

    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g)
    user_a = {"m1": LoraDelta(rnd(2, 6), rnd(5, 2), 0.35), "m2": LoraDelta(rnd(3, 4), rnd(4, 3), 1.5)}
    user_b = {"m1": LoraDelta(rnd(1, 6), rnd(5, 1), -0.5)}
    student_config = LoraConfig(r=4, lora_alpha=8, target_modules=["m1", "m3"])
    student = {"m1.lora_A.weight": rnd(4, 6), "m1.lora_B.weight": rnd(5, 4),
               "m3.lora_A.weight": rnd(4, 7), "m3.lora_B.weight": rnd(2, 4)}
    state, config = combined_lora(student, student_config, [user_a, user_b], {"transformer": ""})
    assert config.r == config.lora_alpha == 3 + 1 + 4 and sorted(config.target_modules) == ["m1", "m2", "m3"]
    expected = {
        "m1": sum(d.factor * d.up @ d.down for d in (user_a["m1"], user_b["m1"]))
        + 2.0 * student["m1.lora_B.weight"] @ student["m1.lora_A.weight"],
        "m2": user_a["m2"].factor * user_a["m2"].up @ user_a["m2"].down,
        "m3": 2.0 * student["m3.lora_B.weight"] @ student["m3.lora_A.weight"],
    }
    for module, delta in expected.items():
        got = state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
        assert got.shape == delta.shape and torch.allclose(got, delta, atol=1e-5), module


def test_wan22_takes_a_lora_per_expert(tmp_path):
    from simpletuner_dmd.families.wan_experts import WanExpertsFamily

    model = WanExpertsFamily.make_tiny(tmp_path / "tiny-wan22")
    family = WanExpertsFamily()
    low = _user_lora(tmp_path / "low", model, network=family.load_network(str(model), dtype=torch.float32)
                     .transformer_2)
    merged = family.load_network(str(model), dtype=torch.float32)
    stock = family.load_network(str(model), dtype=torch.float32)
    merge_teacher_loras(merged, family, [{"path": str(low["original"]), "scale": 1.0, "into": "transformer_2"}])
    high_same = all(torch.equal(a, b) for a, b in zip(merged.transformer.parameters(), stock.transformer.parameters()))
    low_same = all(torch.equal(a, b) for a, b in zip(merged.transformer_2.parameters(),
                                                     stock.transformer_2.parameters()))
    assert high_same and not low_same
    [deltas] = read_teacher_loras(family, [{"path": str(low["diffusers"]), "scale": 1.0, "into": "transformer_2"}])
    assert all(name.startswith("transformer_2.blocks.") for name in deltas)


# --------------------------------------------------------------------------- a run with teacher_loras, exported


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_wan, tiny_dataset):
    """A 2-step DMD run whose teacher is the tiny Wan with a strong user LoRA (original layout) at scale 0.8."""
    from tests.test_using_the_student import EXACT, _train

    root = tmp_path_factory.mktemp("teacher-loras")
    user_lora = _user_lora(root / "user-lora", tiny_wan, std=0.6, seed=1)
    entries = [{"path": str(user_lora["original"]), "scale": 0.8}]
    out, config = _train(root, tiny_wan, tiny_dataset, use_ema=False, disable_benchmark=True, lora_rank=8,
                         lora_alpha=4, learning_rate=1e-2, lr_warmup_steps=0, teacher_loras=entries, **EXACT)
    return out, config


def test_the_combined_lora_on_the_stock_base_reproduces_the_validation_sample(trained, tiny_wan):
    from diffusers import WanPipeline

    from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler

    out, config = trained
    expected = load_file(str(out / "validation" / "step-2" / "validation" / "student" / "latents.safetensors"))[
        "latents"]
    kwargs = dict(prompt=config["validation_prompt"], guidance_scale=1.0, num_inference_steps=3, width=32, height=32,
                  num_frames=5, output_type="latent")

    def sample(*loads):
        pipe = WanPipeline.from_pretrained(str(tiny_wan))
        for load in loads:
            load(pipe)
        pipe.scheduler = FewStepFlowScheduler.from_pretrained(str(out), subfolder="scheduler")
        generator = torch.Generator().manual_seed(config["validation_seed"])
        noise = torch.randn(expected.shape, generator=generator)
        pipe.scheduler.generator = generator
        return pipe(latents=noise, **kwargs).frames

    combined = sample(lambda pipe: pipe.load_lora_weights(str(out / "combined")))
    assert torch.allclose(combined, expected, atol=1e-5, rtol=0), (combined - expected).abs().max()

    # the student alone on the stock base is another model: it needs the user's LoRA beside it, at its scale
    alone = sample(lambda pipe: pipe.load_lora_weights(str(out)))
    assert (alone - expected).abs().max() > 1e-3

    def both(pipe):
        pipe.load_lora_weights(str(out), adapter_name="student")
        pipe.load_lora_weights(config["teacher_loras"][0]["path"], adapter_name="user")
        pipe.set_adapters(["student", "user"], adapter_weights=[1.0, 0.8])

    together = sample(both)
    assert torch.allclose(together, expected, atol=1e-5, rtol=0), (together - expected).abs().max()


def test_the_combined_lora_in_the_original_layout_loads_with_the_same_outputs(trained, tiny_wan):
    from diffusers import WanPipeline

    out, config = trained
    rank = 4 + config["lora_rank"]  # the user's rank and the student's, concatenated
    name = f"wan_dmd_3step_combined_lora_rank{rank}.safetensors"
    original = load_file(str(out / "combined" / name))
    assert all(k.startswith("diffusion_model.blocks.") for k in original)
    assert any(".ffn." in k for k in original) and any(".self_attn.v." in k for k in original)
    outputs = []
    for weight_name in ("pytorch_lora_weights.safetensors", name):
        pipe = WanPipeline.from_pretrained(str(tiny_wan))
        pipe.load_lora_weights(str(out / "combined"), weight_name=weight_name)
        outputs.append(_call(pipe.transformer))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5, rtol=0), (outputs[0] - outputs[1]).abs().max()

    card = (out / "README.md").read_text()
    assert "combined/" in card and "scale 0.8" in card
    info = json.loads((out / "simpletuner_dmd.json").read_text())
    assert info["teacher_loras"] == config["teacher_loras"] or info["teacher_loras"][0]["scale"] == 0.8
    assert info["combined_lora"] == "combined"


def test_sample_runs_the_combined_lora_and_the_teacher_with_the_users_lora(trained, tmp_path):
    import numpy as np
    from PIL import Image

    from simpletuner_dmd.sample import SampleRequest, sample

    out, config = trained
    sample(SampleRequest(base=config["pretrained_model_name_or_path"], student=out, out=tmp_path / "samples",
                         prompts={"p": config["validation_prompt"]}, seeds=[config["validation_seed"]],
                         teacher_steps=2, teacher_guidance=1.0), log=lambda line: None)
    folder = tmp_path / "samples" / "p" / f"seed-{config['validation_seed']}"
    validation = out / "validation" / "step-2" / "validation" / "student"
    frames = lambda f: np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
                                 for p in sorted(f.glob("frame-*.png"))])
    assert np.abs(frames(folder / "student") - frames(validation)).max() <= 1  # the validation sample, on the stock base
    assert (tmp_path / "samples" / "p" / "sheet.png").is_file() and len(list((folder / "teacher").glob("frame-*")))


def test_the_tiny_example_trains_a_style_lora_then_distils_the_base_with_it(tmp_path, tiny_wan, tiny_dataset,
                                                                            monkeypatch):
    """config_examples/tiny-wan-own-lora as docs/distil-your-own-model.md runs it (2 steps each here): the first
    config's LoRA is the second's teacher_loras, and the second's export has combined/ beside the student."""
    import shutil

    from simpletuner_dmd.hosts.reference.trainer import train
    from tests.conftest import REPO

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "tiny-wan").symlink_to(tiny_wan)
    shutil.copytree(tiny_dataset, tmp_path / "work" / "tiny-dataset")
    for name in ("tiny-wan-own-lora", "tiny-wan-dmd"):
        shutil.copytree(REPO / "config_examples" / name, tmp_path / "config_examples" / name)
    monkeypatch.chdir(tmp_path)
    example = Path("config_examples/tiny-wan-own-lora")
    style = train(example / "style-lora.json", overrides={"max_train_steps": 2, "validation_disable": True})
    assert (style / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((example / "config.json").read_text())["teacher_loras"][0]["path"] == str(
        style / "pytorch_lora_weights.safetensors")
    out = train(example / "config.json", overrides={"max_train_steps": 2, "validation_disable": True})
    for file in ("pytorch_lora_weights.safetensors", "combined/pytorch_lora_weights.safetensors",
                 "ema/combined/pytorch_lora_weights.safetensors"):
        assert (out / file).is_file(), file
    assert list((out / "combined").glob("wan_dmd_3step_combined_lora_rank*.safetensors"))


def test_wan22_combined_lora_in_the_stock_pipeline_equals_the_student_on_the_merged_experts(tmp_path):
    """Wan 2.2 A14B: a user LoRA on the low-noise expert only, a student on both: the combined files (one per expert,
    targets named within each transformer) loaded into the stock two-expert WanPipeline give each expert's output of
    the student on the merged base."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from simpletuner_dmd.families.wan_experts import WanExpertsFamily

    model = WanExpertsFamily.make_tiny(tmp_path / "tiny-wan22")
    family = WanExpertsFamily()
    low = _user_lora(tmp_path / "low", model, network=family.load_network(str(model), dtype=torch.float32)
                     .transformer_2, std=0.4)
    entries = [{"path": str(low["diffusers"]), "scale": 0.5, "into": "transformer_2"}]
    network = family.load_network(str(model), dtype=torch.float32)
    merge_teacher_loras(network, family, entries)
    network.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                        adapter_name="student")
    g = torch.Generator().manual_seed(5)
    for name, p in network.named_parameters():
        if ".lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    state = get_peft_model_state_dict(network, adapter_name="student")
    combined, config = combined_lora(state, network.peft_config["student"], read_teacher_loras(family, entries),
                                     family.lora_parts)
    assert config.r == 8 and not any(t.startswith("transformer") for t in config.target_modules)
    family.save_lora(combined, tmp_path / "combined", config)

    pipe = WanPipeline.from_pretrained(str(model))
    with warnings.catch_warnings():  # each expert's file holds every module its config names (peft warns otherwise)
        warnings.simplefilter("error", RuntimeWarning)
        family.load_lora_into_pipeline(pipe, tmp_path / "combined", adapter_name="combined")
    for expert in ("transformer", "transformer_2"):
        want, got = _call(getattr(network, expert)), _call(getattr(pipe, expert))
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (expert, (got - want).abs().max())
