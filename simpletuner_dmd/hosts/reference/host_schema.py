"""The SimpleTuner config keys the reference host honours, and the ones it tells the user it does not.

SimpleTuner configs carry many keys; a key this host does not know is a warning (naming it, with a close match), not
an error. A key of the seed quickstart that this host does not implement gets its own warning that says so. This
module holds the keys; ``run_config.py`` checks a whole config against them (and the files and folders they name).
"""

from __future__ import annotations

import re
from typing import Any

from ...config import Key, Schema, in_range
from ...optimizers import CHOICES as OPTIMIZER_CHOICES
from ...teacher_loras import parse_teacher_loras


def parse_resolution(value: Any) -> tuple[int, int]:
    """"1280x704" (width x height) or a single int (square) → (width, height)."""
    if isinstance(value, int) and not isinstance(value, bool):
        w = h = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", value):
        w, h = (int(p) for p in re.split(r"[xX]", value))
    else:
        raise ValueError(f"must be \"WIDTHxHEIGHT\" like \"1280x704\" or an integer, got {value!r}")
    if w < 1 or h < 1:
        raise ValueError(f"width and height must be at least 1, got {w}x{h}")
    return (w, h)  # the family's size_multiple is checked once the family is known (run_config.family_key_problems)


def _frames_check(v: int) -> str | None:
    return None if v >= 1 else f"must be at least 1, got {v}"  # the family's 1 + stride·k rule: run_config


def _tracker_name_check(v: str) -> str | None:
    # accelerate's tensorboard tracker writes to output_dir/<tracker_project_name>: a name is one folder name, never a
    # path that could leave output_dir
    if not v.strip() or v.strip() in (".", "..") or any(c in v for c in "/\\\0"):
        return f"must be a plain name (not empty, '.' or '..', no '/', '\\' or NUL character), got {v!r}"
    return None


def _path_check(v: str) -> str | None:
    return f"must be a path without NUL characters, got {v!r}" if "\0" in v else None


def _output_dir_check(v: str) -> str | None:
    if not v.strip():
        return "must name a folder (not empty)"
    return _path_check(v)


def _step_counts(value: Any) -> list[int]:
    """\"50,3\", 50 or [50, 3] → [50, 3]: positive step counts."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        counts = [int(str(v).strip()) for v in items]
    except ValueError:
        raise ValueError(f"must be step counts like \"50,3\", got {value!r}") from None
    if not counts or any(c < 1 for c in counts) or len(set(counts)) != len(counts):
        raise ValueError(f"must be distinct positive step counts like \"50,3\", got {value!r}")
    return counts


def _guidance_check(v: float) -> str | None:
    if v < 0 or 0 < v < 1:
        return f"must be 0 or 1 (off) or greater than 1, got {v}"
    return None


HOST_SCHEMA = Schema(
    keys=(
        Key("model_family", "str", None, "Model family: a registered family name (`simpletuner-dmd plugins` lists "
            "them).", required=True),
        Key("model_type", "str", "lora", "lora: the student is an adapter on a frozen base; full: all weights train.",
            choices=("lora", "full")),
        Key("pretrained_model_name_or_path", "str", None, "Local diffusers folder (or a hub id where a hub is "
            "reachable) of the teacher/base model.", check=_path_check, nullable=True),
        Key("pretrained_t5_model_name_or_path", "str", None, "Where the text encoder and tokenizer live "
            "(default: the model folder).", check=_path_check, nullable=True),
        Key("lora_rank", "int", 16, "Rank of the student's LoRA.", check=in_range(1)),
        Key("lora_alpha", "float", None, "LoRA alpha (default: the rank).", check=in_range(0, lo_open=True),
            nullable=True),
        Key("lora_type", "str", "standard", "Only standard (peft LoRA) is implemented.", choices=("standard",)),
        Key("init_lora", "str", None, "Start the student's LoRA from these weights: an output folder (its "
            "pytorch_lora_weights.safetensors) or that file, e.g. an ode_init run's before DMD. Same lora_rank and "
            "family; a resumed run's checkpoint wins.", check=_path_check, nullable=True),
        Key("teacher_loras", "list", [], "Your own LoRAs, merged into the frozen base before it is quantized or "
            "sharded, so the teacher (and the student's base) is your model: a list of {\"path\": file, \"scale\": "
            "1.0} (a plain path: scale 1.0; \"into\": \"transformer_2\" for Wan 2.2's low-noise expert), each in "
            "the diffusers or the original (ComfyUI) layout. The export adds combined/: one LoRA with yours and the "
            "student's for the stock base: [distil-your-own-model.md](distil-your-own-model.md).", parse=parse_teacher_loras),
        Key("lora_dropout", "float", 0.0, "Dropout inside the student's LoRA.", check=in_range(0, 1, hi_open=True)),
        Key("base_model_precision", "str", "no_change", "int8-quanto: quantize the frozen base to int8 "
            "(optimum-quanto).", choices=("no_change", "int8-quanto")),
        Key("text_encoder_1_precision", "str", "no_change", "int8-quanto: quantize the text encoder.",
            choices=("no_change", "int8-quanto")),
        Key("tokenizer_max_length", "int", None, "Text tokens per prompt, padded or cut to this length (default: "
            "the family's own; Wan: 512, as WanPipeline; SimpleTuner's Wan always uses 512). Shorter is cheaper, "
            "but a pretrained model was trained with its own length.", check=in_range(1), nullable=True),
        Key("quantize_via", "str", "cpu", "Quantize on the CPU before moving to the accelerator, or on it.",
            choices=("cpu", "accelerator")),
        Key("gradient_checkpointing", "bool", False, "Recompute activations in backward to save memory."),
        Key("activation_offload", "bool", False, "Keep the tensors saved for the student's and the critic's backward "
            "(with gradient_checkpointing: each block's input) in pinned CPU memory instead of on the GPU; the "
            "gradients are the same. `simpletuner-dmd estimate` says how much it saves."),
        Key("fsdp_enable", "bool", False, "Shard the frozen base over the processes of `accelerate launch` with "
            "FSDP2 (each transformer block and the root); the adapters (student, fake score) stay whole on every "
            "process, as their optimizers and checkpoints. One process: nothing to shard. Not with an int8-quanto "
            "base."),
        Key("fsdp_version", "int", 2, "FSDP version of fsdp_enable: 2 (torch's fully_shard), the only one.",
            choices=(2,)),
        Key("context_parallel_size", "int", 1, "Split one sample's latent tokens over this many processes of "
            "`accelerate launch` (Ulysses, diffusers' context parallelism): the student, teacher and fake-score "
            "passes and their backward; with fsdp_enable or without. It must divide the process count, the attention "
            "heads and the tokens; LoRA student; families with a diffusers _cp_plan (wan, wan-i2v, wan2.2-ti2v). "
            "1: off.",
            check=in_range(1)),
        Key("mixed_precision", "str", "no", "bf16/fp16 on a GPU; CPU runs fp32.", choices=("no", "bf16", "fp16")),
        Key("attention_mechanism", "str", "diffusers", "Only diffusers' default attention is used.",
            choices=("diffusers",)),
        Key("optimizer", "str", "adamw", "adamw / torch-adamw: torch AdamW; adamw_bf16: torch AdamW on the "
            "run's weight dtype (no bf16 stochastic rounding in this stack); ao-adamw8bit: torchao's AdamW8bit, "
            "8-bit moments (needs torchao). A method's own optimizers (DMD's fake score) follow it.",
            choices=OPTIMIZER_CHOICES),
        Key("learning_rate", "float", 1e-4, "Student learning rate.", check=in_range(0, lo_open=True)),
        Key("adam_beta1", "float", 0.9, "Student AdamW beta1.", check=in_range(0, 1, hi_open=True)),
        Key("adam_beta2", "float", 0.999, "Student AdamW beta2.", check=in_range(0, 1, hi_open=True)),
        Key("adam_weight_decay", "float", 1e-2, "Student AdamW weight decay.", check=in_range(0)),
        Key("adam_epsilon", "float", 1e-8, "Student AdamW epsilon.", check=in_range(0, lo_open=True)),
        Key("lr_scheduler", "str", "constant", "Student LR schedule (counted in optimizer steps).",
            choices=("constant", "constant_with_warmup", "cosine", "cosine_with_min_lr", "linear")),
        Key("lr_warmup_steps", "int", 0, "Linear warm-up steps.", check=in_range(0)),
        Key("lr_end", "float", 4e-7, "Final LR of cosine_with_min_lr.", check=in_range(0)),
        Key("max_train_steps", "int", 0, "Optimizer steps to train (0: use num_train_epochs).", check=in_range(0)),
        Key("num_train_epochs", "int", 1, "Epochs, when max_train_steps is 0.", check=in_range(0)),
        Key("train_batch_size", "int", 1, "Samples per micro-batch.", check=in_range(1)),
        Key("gradient_accumulation_steps", "int", 1, "Micro-batches per optimizer step.", check=in_range(1)),
        Key("max_grad_norm", "float", 1.0, "Student gradient clip (0: off).", check=in_range(0)),
        Key("nonfinite_skip_limit", "int", 5, "Stop after this many optimizer steps in a row whose loss or gradient "
            "is not finite in one turn (each such update is skipped and counted).", check=in_range(1)),
        Key("grad_clip_method", "str", "norm", "Clip the student's gradient by global norm or by value.",
            choices=("norm", "value")),
        Key("seed", "int", 0, "Seed of every random stream.", nullable=True),
        Key("torch_num_threads", "int", None, "CPU threads of torch's operators (default: torch's own, one per "
            "core). Networks as small as the embedded example's run several times faster on 1.", check=in_range(1),
            nullable=True),
        Key("use_ema", "bool", False, "Keep an EMA of the student's trainable weights."),
        Key("ema_update_interval", "int", 1, "Update the EMA every N optimizer steps.", check=in_range(1)),
        Key("ema_decay", "float", 0.995, "EMA decay per update.", check=in_range(0, 1, lo_open=True, hi_open=True)),
        Key("ema_validation", "str", "comparison", "Validate with the EMA (ema_only), both (comparison) or the raw "
            "student (none).", choices=("none", "ema_only", "comparison")),
        Key("checkpoint_step_interval", "int", 0, "Save a checkpoint every N optimizer steps (0: only at the end).",
            check=in_range(0)),
        Key("checkpoints_total_limit", "int", None, "Keep at most N checkpoints.", check=in_range(1), nullable=True),
        Key("resume_from_checkpoint", "str", None, "latest, or a checkpoint folder name.", check=_path_check,
            nullable=True),
        Key("validation_step_interval", "int", 0, "Validate every N optimizer steps (0: only at the end).",
            check=in_range(0)),
        Key("validation_disable", "bool", False, "Skip validation entirely."),
        Key("validation_num_inference_steps", "int", 30, "Sampler steps of the host's default sampler.",
            check=in_range(1)),
        Key("validation_prompt", "str", None, "Prompt of the validation samples.", nullable=True),
        Key("validation_negative_prompt", "str", "", "Negative prompt (also DMD's unconditional branch)."),
        Key("validation_prompt_library", "str", None, "JSON file of extra validation prompts in SimpleTuner's "
            "prompt-library format ({name: prompt} or {name: {\"prompt\": …}}); each name is its samples' folder.",
            check=_path_check, nullable=True),
        Key("user_prompt_library", "str", None, "SimpleTuner's key for the same kind of file; both may be given.",
            check=_path_check, nullable=True),
        Key("validation_image", "str", None, "Image file of the first frame that image-to-video families "
            "(wan-i2v) sample every validation prompt from; resized to validation_resolution when its size differs.",
            check=_path_check, nullable=True),
        Key("validation_seed", "int", None, "Seed of the validation noise (default: seed).", nullable=True),
        Key("validation_resolution", "any", (480, 480),
            "\"WxH\" or an int; multiples of the family's size_multiple (Wan: 16).", parse=parse_resolution),
        Key("validation_num_video_frames", "int", 1,
            "Pixel frames of validation videos: 1 + frame_stride·k (Wan: 1 + 4k).", check=_frames_check),
        Key("validation_guidance", "float", 1.0, "CFG scale of validation sampling (standard form; 1: off).",
            check=_guidance_check),
        Key("validation_teacher_steps", "any", None, "The teacher's reference samples of a distillation run: one "
            "column of the comparison sheet per step count (Euler, the base with its adapters off), e.g. \"50,3\"; "
            "default: one, at validation_num_inference_steps.", parse=_step_counts, nullable=True),
        Key("validation_teacher_guidance", "float", None, "CFG scale of the teacher's reference samples (standard "
            "form); default: validation_guidance. Set it to the guidance the student was distilled toward.",
            check=_guidance_check, nullable=True),
        Key("validation_teacher_guidance_2", "float", None, "A family with experts (wan2.2): the teacher's reference "
            "samples' CFG scale where the second (low-noise) expert runs (WanPipeline's guidance_scale_2); "
            "validation_teacher_guidance is then the first expert's. Default: validation_teacher_guidance on both. "
            "Set them to real_score_guidance_scale and real_score_guidance_scale_2.", check=_guidance_check,
            nullable=True),
        Key("validation_fd_features", "str", None, "A feature folder (features.json + features.safetensors; "
            "make-example writes work/digits-fd): the run ends with the Fréchet distance of the student's and every "
            "teacher column's samples to the real data in that feature space, printed and in output_dir/fd.json.",
            check=_path_check, nullable=True),
        Key("validation_fd_samples", "int", 500, "Samples per row of that Fréchet distance (the validation prompts "
            "in turn).", check=in_range(2)),
        Key("report_to", "str", "none", "Tracker: wandb (offline unless WANDB_MODE says otherwise), tensorboard, "
            "none.", choices=("wandb", "tensorboard", "none")),
        Key("tracker_project_name", "str", "simpletuner-dmd", "Tracker project.", check=_tracker_name_check),
        Key("tracker_run_name", "str", "run", "Tracker run name.", check=_tracker_name_check),
        Key("output_dir", "str", "output/models", "Where checkpoints, samples and the final LoRA go.",
            check=_output_dir_check),
        Key("cache_dir", "str", None, "Where a method keeps what it computes once and reuses across runs (DMD's "
            "teacher ODE pairs, in cache_dir/ode_pairs); default: output_dir/cache.", check=_output_dir_check,
            nullable=True),
        Key("data_backend_config", "str", None, "The multidatabackend JSON file.", check=_path_check, nullable=True),
        Key("webhook_config", "any", None, "SimpleTuner's webhook targets (a JSON file, an object or a list of them; "
            "discord or raw): start, checkpoints, validation samples, finish and errors; a failure never stops "
            "training.", nullable=True),
        Key("push_to_hub", "bool", False, "Upload the final output (LoRA files, scheduler, model card, samples) to "
            "hub_model_id; a failed upload exits non-zero after everything is saved locally."),
        Key("push_checkpoints_to_hub", "bool", False, "Upload each checkpoint in the background as it is written "
            "(a failure is one warning, retried with the next)."),
        Key("hub_model_id", "str", None, "The hub repository (name or namespace/name) to push to.", nullable=True),
        Key("minimum_image_size", "int", None, "Skip media whose shorter side (resolution_type pixel) or √area "
            "(pixel_area) is under this many pixels; each skipped file is listed in output_dir/data_report.json "
            "(0 or null: no minimum; a backend's own key overrides it).", check=in_range(0), nullable=True),
        Key("delete_problematic_images", "bool", False, "A media file that cannot be decoded is always skipped and "
            "listed in output_dir/data_report.json; true also deletes it (the report says which)."),
        Key("aspect_bucket_rounding", "int", None, "Round each media file's aspect ratio to this many decimals "
            "before sizing it, so nearly equal aspects share a bucket (null: exact).", check=in_range(1, 9),
            nullable=True),
        Key("disable_bucket_pruning", "bool", False, "Keep the incomplete batch of each bucket (false, as in "
            "SimpleTuner: a bucket's remainder smaller than train_batch_size is dropped each epoch)."),
        Key("compress_disk_cache", "bool", False, "Write new latent and text-embedding cache files gzip-compressed "
            "(.safetensors.gz); files already cached in either form are reused."),
        Key("disable_benchmark", "bool", False, "Skip the baseline validation before training (false: a fresh run "
            "validates at step 0, so the untrained student's samples sit beside the trained ones)."),
        Key("ignore_final_epochs", "bool", True, "With both max_train_steps and num_train_epochs set, train "
            "max_train_steps (true) or stop at whichever ends first (false)."),
        Key("caption_dropout_probability", "float", 0.0, "Drop captions in the host's own loss (not in DMD).",
            check=in_range(0, 1)),
        Key("boundary_ratio", "float", None, "A family with experts (wan2.2): where they switch, as WanPipeline's "
            "config names it (t >= boundary_ratio·1000 runs the high-noise expert); published: 0.875 T2V, 0.9 I2V. "
            "Default: the model's model_index.json.", check=in_range(0, 1, lo_open=True, hi_open=True),
            nullable=True),
        Key("flow_schedule_shift", "float", 3.0, "Timestep shift of the host's flow-matching loss and default "
            "sampler.", check=in_range(0, lo_open=True)),
        Key("resolution", "int", 480, "Default dataset resolution (pixels).", check=in_range(16)),
        Key("resolution_type", "str", "pixel_area", "How resolution is read.", choices=("pixel_area", "pixel")),
        Key("vae_batch_size", "int", 4, "Items per VAE call while caching.", check=in_range(1)),
    ),
    cross_checks=(
        lambda v: (["max_train_steps: one of max_train_steps and num_train_epochs must be > 0"]
                   if v["max_train_steps"] == 0 and v["num_train_epochs"] == 0 else []),
        lambda v: (["init_lora: needs model_type lora (it loads the student's LoRA weights)"]
                   if v["init_lora"] and v["model_type"] != "lora" else []),
        lambda v: ([f"hub_model_id: {'push_to_hub' if v['push_to_hub'] else 'push_checkpoints_to_hub'} needs the "
                    "hub repository to push to"]
                   if (v["push_to_hub"] or v["push_checkpoints_to_hub"]) and not v["hub_model_id"] else []),
    ),
)

# Keys of the seed quickstart this host does not implement, and what that means for the user.
SEED_KEYS_NOT_SUPPORTED: dict[str, str] = {
}
