"""The user's own LoRAs as the teacher inside SimpleTuner (issue 30): ``teacher_loras`` in ``distillation_config``
(SimpleTuner has no key that merges a LoRA into its base: ``base_loras.py``) is checked before the launch and merged
into SimpleTuner's loaded base before its ``init_precision`` and before any adapter, through ``simpletuner train``."""

from __future__ import annotations

import json

import pytest
import torch

from harness import SKIP_WITHOUT_VENV, assert_clean, simpletuner_train

pytestmark = SKIP_WITHOUT_VENV


def _user_lora(path, model) -> None:
    """A random LoRA of the tiny Wan transformer (attention and feed-forward layers) in the original (ComfyUI)
    layout, rank 4, alpha 2."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from simpletuner_dmd.families.wan import WanFamily

    family = WanFamily()
    network = family.load_network(str(model), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "ffn.net.0.proj"])
    network.add_adapter(config, adapter_name="user")
    g = torch.Generator().manual_seed(3)
    for name, p in network.named_parameters():
        if ".lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    save_file(family.original_lora_state(get_peft_model_state_dict(network, adapter_name="user"), config), str(path))


def test_teacher_loras_are_merged_into_simpletuners_base_before_its_precision_and_adapters(job):
    from safetensors.torch import load_file

    from simpletuner_dmd.families.wan import WanFamily
    from simpletuner_dmd.teacher_loras import merge_teacher_loras

    root, write = job
    run = root / "st-train-teacher-loras"
    run.mkdir()
    lora = run / "style_lora.safetensors"
    _user_lora(lora, root / "tiny-wan")

    # a missing file is refused before the launch, one line naming the entry
    bad = f"{{'teacher_loras': ['{run / 'missing.safetensors'}'], 'dmd': {{'generator_update_interval': 1}}}}"
    config = write.config(output_dir=str(run / "refused"), max_train_steps=1, distillation_method="dmd",
                          distillation_config=bad)
    code, text, _ = simpletuner_train(run / "refused-run", config, timeout=300)
    assert f"distillation_config.teacher_loras[0].path: file not found: {run / 'missing.safetensors'}" in text, \
        text[-3000:]
    assert not (run / "refused").exists() or not any((run / "refused").rglob("*.safetensors"))

    dmd = f"{{'teacher_loras': [{{'path': '{lora}', 'scale': 0.7}}], 'dmd': {{'generator_update_interval': 1}}}}"
    config = write.config(output_dir=str(run / "out"), max_train_steps=1, checkpoint_step_interval=1,
                          distillation_method="dmd", distillation_config=dmd)
    code, text, seconds = simpletuner_train(run, config, SIMPLETUNER_DMD_TEST_BASE_WITNESS=str(run / "witness"))
    assert_clean(text, "simpletuner train with teacher_loras")
    assert code == 0, text[-3000:]
    assert f"[simpletuner-dmd] teacher_loras: merged {lora} (scale 0.7, 10 modules of transformer) into the frozen " \
           "base" in text, text[-3000:]
    assert "[simpletuner-dmd] step 1: " in text and (run / "out" / "checkpoint-1").is_dir()

    # what SimpleTuner trains on, after its init_precision and before any adapter: the user's model
    witness = load_file(str(run / "witness" / "base.safetensors"))
    assert not any("lora" in name for name in witness)
    family = WanFamily()
    expected = family.load_network(str(root / "tiny-wan"), dtype=torch.float32)
    plain = {k: v.clone() for k, v in expected.state_dict().items()}
    merge_teacher_loras(expected, family, [{"path": str(lora), "scale": 0.7, "into": "transformer"}])
    changed = [k for k, v in expected.state_dict().items() if not torch.equal(v, plain[k])]
    assert len(changed) == 10 and set(changed) <= set(witness)
    assert all(torch.allclose(witness[k], v, atol=1e-6, rtol=0) for k, v in expected.state_dict().items()), \
        json.dumps({k: float((witness[k] - v).abs().max()) for k, v in expected.state_dict().items()
                    if not torch.allclose(witness[k], v, atol=1e-6, rtol=0)})

    # the checkpoint's combined LoRA: the user's delta at 0.7 plus the student's (lora_alpha = rank: factor 1)
    from simpletuner_dmd.teacher_loras import read_teacher_loras

    ckpt = run / "out" / "checkpoint-1"
    assert f"combined LoRA (your teacher_loras and the student, for the stock base): {ckpt / 'combined'}" in text
    combined = load_file(str(ckpt / "combined" / "pytorch_lora_weights.safetensors"))
    student = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v  # 3.1.6's older key names
               for k, v in load_file(str(ckpt / "pytorch_lora_weights.safetensors")).items()}
    [user] = read_teacher_loras(family, [{"path": str(lora), "scale": 0.7, "into": "transformer"}])
    modules = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in combined if ".lora_A." in k}
    assert set(user) < modules and len(modules) > len(user)  # the student's modules and the user's
    for module in modules:
        got = combined[f"transformer.{module}.lora_B.weight"] @ combined[f"transformer.{module}.lora_A.weight"]
        want = torch.zeros_like(got)
        if f"transformer.{module}.lora_A.weight" in student:
            want += student[f"transformer.{module}.lora_B.weight"] @ student[f"transformer.{module}.lora_A.weight"]
        if module in user:
            want += user[module].factor * user[module].up @ user[module].down
        assert torch.allclose(got, want, atol=1e-6), module
    print(f"simpletuner train, DMD with teacher_loras, 1 step: {seconds:.0f} s")


@pytest.mark.parametrize("value, problem", [
    ("{'teacher_loras': [{'path': 'x.safetensors', 'scale': 'strong'}]}",
     "distillation_config.teacher_loras[0].scale: must be a finite number, got 'strong'"),
    ("{'teacher_loras': [{'path': 'x.safetensors', 'into': 'transformer_2'}]}",
     "distillation_config.teacher_loras[0].into: the wan family's LoRAs go into 'transformer', got 'transformer_2'"),
])
def test_a_bad_teacher_loras_entry_is_one_line_of_the_plugins_checks(job, value, problem):
    from simpletuner_dmd.hosts.simpletuner.preflight import plugin_problems
    from simpletuner_dmd.plugins import get_plugin_manager

    _, write = job
    problems, _ = plugin_problems(write.config(distillation_method="dmd", distillation_config=value), "dmd",
                                  get_plugin_manager())
    assert problem in problems, problems
