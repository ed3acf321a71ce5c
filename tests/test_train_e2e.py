"""The reference host end to end on the tiny local Wan model: hook order, checkpoints, the LoRA, resume, trackers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from simpletuner_dmd import hookimpl
from simpletuner_dmd.hosts.reference.trainer import train

REPO = Path(__file__).resolve().parents[1]


class Recorder:
    """Runs before the method on every hook (tryfirst) and records the order the host calls them in."""

    def __init__(self):
        self.calls: list[str] = []

    @hookimpl(tryfirst=True)
    def distill_setup(self, run):
        self.calls.append("setup")

    @hookimpl(tryfirst=True)
    def distill_load_state(self, checkpoint_dir):
        self.calls.append(f"load:{Path(checkpoint_dir).name}")

    @hookimpl(tryfirst=True)
    def distill_loss(self, batch, step, host_loss):
        self.calls.append(f"loss:{step.global_step}.{step.micro_step}")

    @hookimpl(tryfirst=True)
    def distill_after_optimizer_step(self, step):
        self.calls.append(f"after_opt:{step.global_step}")

    @hookimpl(tryfirst=True)
    def distill_metrics(self, step):
        self.calls.append(f"metrics:{step.global_step}")

    @hookimpl(tryfirst=True)
    def distill_save_state(self, checkpoint_dir):
        self.calls.append("save")

    @hookimpl(tryfirst=True)
    def distill_sampler(self):
        self.calls.append("sampler")


def test_hook_order_checkpoint_lora_and_resume(job, tiny_wan, tmp_path):
    rec = Recorder()
    out = train(job(max_train_steps=2, gradient_accumulation_steps=2, checkpoint_step_interval=1,
                    checkpoints_total_limit=1, validation_step_interval=0, report_to="wandb"), plugins=(rec,))
    assert rec.calls == [
        "setup", "sampler",  # the baseline validation before training (disable_benchmark: false)
        "loss:0.0", "loss:0.1", "after_opt:0", "metrics:0", "save",
        "loss:1.0", "loss:1.1", "after_opt:1", "metrics:1", "save", "sampler",
    ]
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2"]  # the limit of 1 is honoured
    assert not list(out.glob(".checkpoint-*"))
    ckpt = out / "checkpoint-2"
    for name in ("student.safetensors", "optimizer.json", "optimizer.safetensors", "pytorch_lora_weights.safetensors",
                 "dmd/fake_score.safetensors", "dmd/fake_score_optimizer.safetensors", "dmd/state.json",
                 "checkpoint.json"):
        assert (ckpt / name).is_file(), name
    fake = load_file(str(ckpt / "dmd/fake_score.safetensors"))
    assert fake and all(".fake_score." in k for k in fake)
    assert any(v.abs().sum() > 0 for k, v in fake.items() if ".lora_B." in k)  # the critic has trained
    assert list((out / "validation" / "step-2" / "validation").glob("*/sample.gif"))
    assert list((out / "validation" / "step-0" / "validation").glob("*/sample.gif"))  # the baseline
    assert list(out.glob("wandb/offline-run-*"))  # wandb ran offline, inside output_dir

    # the student's LoRA loads into the diffusers pipeline and changes its output
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    kwargs = dict(prompt="a red digit", num_inference_steps=2, height=32, width=32, num_frames=5, output_type="latent")
    plain = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    lora = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert not torch.equal(plain, lora)
    # DMD's few-step scheduler is saved beside the student and drives the stock pipeline through its timesteps
    from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler

    pipe.scheduler = FewStepFlowScheduler.from_pretrained(str(out / "scheduler"))
    steps = json.loads((tmp_path / "config.json").read_text())["distillation_config"]["dmd_denoising_steps"]
    assert pipe.scheduler.timesteps.tolist() == [float(t) for t in str(steps).split(",")]
    few = pipe(generator=torch.Generator().manual_seed(0), **{**kwargs, "num_inference_steps": 3}).frames
    assert few.shape == lora.shape and torch.isfinite(few).all()

    # resume from latest: the method's state comes back and training goes on at step 2
    rec = Recorder()
    train(job(max_train_steps=3, checkpoint_step_interval=1, checkpoints_total_limit=1, resume_from_checkpoint="latest",
              report_to="tensorboard"), plugins=(rec,))
    assert rec.calls[:3] == ["setup", "load:checkpoint-2", "loss:2.0"]
    state = json.loads((out / "checkpoint-3" / "dmd" / "state.json").read_text())
    assert state["critic_updates"] == 3  # 2 before the interruption + 1 after
    assert list(out.rglob("events.out.tfevents.*"))


def test_plain_lora_without_distillation(job):
    config = job(max_train_steps=2, checkpoint_step_interval=0)
    raw = json.loads(config.read_text())
    del raw["distillation_method"], raw["distillation_config"]
    config.write_text(json.dumps(raw))
    rec = Recorder()
    out = train(config, plugins=(rec,))
    # no method registered: the host's hooks still fire for other plugins, and its own loss trains the student
    assert rec.calls[:2] == ["sampler", "loss:0.0"] and "setup" not in rec.calls  # the baseline, then training
    assert (out / "checkpoint-2" / "student.safetensors").is_file()
    assert not (out / "checkpoint-2" / "dmd").exists()


def test_tokenizer_max_length_sets_the_text_context(job, tmp_path):
    """The host key reaches the family's encoder, and its embeddings are cached apart from the default length's."""

    class Lengths:
        def __init__(self):
            self.seen: list[int] = []

        @hookimpl(tryfirst=True)
        def distill_loss(self, batch, step, host_loss):
            self.seen.append(batch.cond.shape[1])

    text_cache = tmp_path / "cache" / "text-embeds"
    for length, expected in ((None, 512), (8, 8)):
        rec = Lengths()
        train(job(max_train_steps=1, checkpoint_step_interval=0, validation_disable=True,
                  output_dir=str(tmp_path / f"out-{length}"), tokenizer_max_length=length), plugins=(rec,))
        assert rec.seen and set(rec.seen) == {expected}
    captions = {p.read_text() for p in (tmp_path / "data").glob("*.txt")}
    assert len(list(text_cache.glob("*.safetensors"))) >= 2 * len(captions)  # one set per length
