"""The export's model card (``README.md``), text for text: a LoRA video student (Wan, DMD, with its validation sample,
the last step's figures and EMA weights) and an image one (SD3, DMD, prompts capped by ``tokenizer_max_length``). The
expected cards are in ``tests/model_cards/``; a change to the card's text changes them on purpose (rewrite them with
``UPDATE_MODEL_CARDS=1``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler
from simpletuner_dmd.families.sd3 import SD3Family
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.hosts.reference.export import Export, model_card
from simpletuner_dmd.methods.dmd.method import DMD

CARDS = Path(__file__).parent / "model_cards"
OUT = Path("/run/out")  # the card names paths relative to it; nothing is written
HOST = {"pretrained_model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "validation_num_video_frames": 9,
        "model_type": "lora", "validation_prompt": "a red fox running", "validation_negative_prompt": "",
        "validation_resolution": (64, 48), "tokenizer_max_length": None, "validation_seed": None, "seed": 42,
        "lora_rank": 16, "lora_alpha": None, "learning_rate": 2e-6, "train_batch_size": 1,
        "gradient_accumulation_steps": 2}
CONFIG = {"dmd_denoising_steps": [1000, 757, 522], "real_score_guidance_scale": 3.0}


def _family(cls):
    return object.__new__(cls)  # the card reads class members only: no weights


def _cards() -> dict[str, str]:
    scheduler = FewStepFlowScheduler(few_step_timesteps=CONFIG["dmd_denoising_steps"])
    wan = model_card(host=HOST, family=_family(WanFamily), export=Export(
        "dmd", DMD, CONFIG, 100, final_logs={"dmd_loss": 0.123456789, "passes/student": 3.0},
        sample=OUT / "validation" / "step-100" / "validation" / "student" / "sample.gif"),
        scheduler=scheduler, original_files=["wan_dmd_3step_lora_rank16.safetensors"], out=OUT, has_ema=True)
    sd3 = model_card(host={**HOST, "pretrained_model_name_or_path": "stabilityai/stable-diffusion-3.5-medium",
                           "validation_num_video_frames": 1, "tokenizer_max_length": 77, "lora_alpha": 8},
                     family=_family(SD3Family), export=Export("dmd", DMD, CONFIG, 50), scheduler=scheduler,
                     original_files=["sd3_dmd_3step_lora_rank16.safetensors"], out=OUT, has_ema=False)
    return {"wan_dmd_lora_video": wan, "sd3_dmd_lora_image": sd3}


@pytest.mark.parametrize("name", ["wan_dmd_lora_video", "sd3_dmd_lora_image"])
def test_the_model_card_is_the_expected_text(name):
    card = _cards()[name]
    expected = CARDS / f"{name}.md"
    if os.environ.get("UPDATE_MODEL_CARDS"):
        expected.write_text(card, encoding="utf-8")
    assert card == expected.read_text(encoding="utf-8")
