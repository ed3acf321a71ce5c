"""The SimpleTuner bridge computes what the reference host computes.

Runs in the project's own environment: SimpleTuner is not imported. ``StandInModel`` has the shape of SimpleTuner
3.1.6's Wan model object as far as the bridge touches it (``accelerator``, ``get_trained_component()`` returning the
transformer with SimpleTuner's one LoRA adapter named ``default``, ``encode_text_batch`` returning
``{"prompt_embeds", "attention_masks"}``, ``text_encoders``); the batch has SimpleTuner's keys. The real SimpleTuner is
exercised by ``test_simpletuner_host.py``.

For the same weights, batch, seed and step: the DMD loss, every student gradient, the critic's loss and the fake
score's weights after its step are bit-identical through both hosts.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest
import torch

from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.hosts.reference import trainer as T
from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA
from simpletuner_dmd.hosts.simpletuner.distiller import STATE_FILE, PluginDistiller
from simpletuner_dmd.hosts.simpletuner.patch import stash_negative_embeds
from simpletuner_dmd.types import step_generator
from simpletuner_dmd.methods.dmd.config import DMD_SCHEMA
from simpletuner_dmd.plugins import get_plugin_manager, get_method_class
from simpletuner_dmd.types import Batch, RunContext

NEGATIVE = "ugly, blurry"
SEED = 7
ST_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # SimpleTuner's Wan DEFAULT_LORA_TARGET


def embed(texts: list[str]) -> torch.Tensor:
    out = [torch.randn(8, 32, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
    return torch.stack(out)


class StandInModel:
    """SimpleTuner's model object, as far as the bridge touches it."""

    def __init__(self, network, accelerator):
        self.model = network
        self.accelerator = accelerator
        self.text_encoders = [object()]
        self.encoded: list[str] = []

    def get_trained_component(self, base_model: bool = False, unwrap_model: bool = True):
        return self.model

    def encode_text_batch(self, texts, is_negative_prompt=False):
        self.encoded += texts
        return {"prompt_embeds": embed(texts), "attention_masks": torch.ones(len(texts), 8)}


def _renamed(name: str, src: str, dst: str) -> str:
    return name.replace(f".{src}.", f".{dst}.")


def _copy_adapter(src_net, src: str, dst_net, dst: str) -> None:
    dst_params = dict(dst_net.named_parameters())
    with torch.no_grad():
        for name, p in src_net.named_parameters():
            if f".{src}." in name:
                dst_params[_renamed(name, src, dst)].copy_(p)


@pytest.fixture()
def hosts(tiny_wan, tmp_path):
    """The reference host's student and method, and the bridge's, with identical weights."""
    from accelerate import Accelerator
    from peft import LoraConfig

    dmd = {"real_score_guidance_scale": 3.0, "generator_update_interval": 2, "fake_score_lr": 1e-3}
    accelerator = Accelerator(cpu=True)
    family = WanFamily()
    host = {**HOST_SCHEMA.defaults(), "pretrained_model_name_or_path": str(tiny_wan), "lora_rank": 4,
            "lora_alpha": 4.0, "validation_negative_prompt": NEGATIVE, "seed": SEED}
    dmd_cfg, problems, _ = DMD_SCHEMA.validate(dmd, prefix="distillation_config")
    assert not problems

    # ---- the reference host (its own build_models, RunContext and plugin manager)
    new_network = lambda: T.frozen_base(host, family, torch.float32)  # noqa: E731
    models = T.build_models(host, family, accelerator, new_network=new_network, distilling=True)
    ref_pm = get_plugin_manager()
    ref_method = get_method_class(ref_pm, "dmd")(dmd_cfg)
    ref_pm.register(ref_method, name="method:dmd")
    ref_pm.hook.distill_setup(run=RunContext(
        host_config=host, method_config=dmd_cfg, family=family, student=models.network, accelerator=accelerator,
        encode_prompts=embed, negative_prompt=NEGATIVE, output_dir=tmp_path, model_type="lora",
        student_adapter=T.STUDENT_ADAPTER, load_base=new_network, seed=SEED))

    # ---- SimpleTuner's side: its LoRA ("default", add_lora_adapter's config), then the bridge
    network = new_network()
    network.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, init_lora_weights=True,
                                   target_modules=ST_LORA_TARGETS))
    for name, p in network.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
    _copy_adapter(models.network, T.STUDENT_ADAPTER, network, "default")
    model = StandInModel(network, accelerator)
    config = {  # vars(SimpleTuner's config), the keys the bridge reads
        "distillation_method": "dmd", "distillation_config": {"dmd": dict(dmd)}, "model_family": "wan",
        "model_type": "lora", "lora_type": "standard", "weight_dtype": torch.float32, "seed": SEED,
        "gradient_accumulation_steps": 1, "validation_negative_prompt": NEGATIVE, "output_dir": str(tmp_path),
        "pretrained_model_name_or_path": str(tiny_wan),
    }
    stash_negative_embeds(model, config, "dmd")  # what patch.py does before SimpleTuner unloads its text encoder
    model.text_encoders = None  # ... and then SimpleTuner unloads it
    distiller = PluginDistiller("dmd", teacher_model=model, config=config, model_type="lora", model_family="wan",
                                prediction_type="flow_matching", load_base=new_network)
    # The fake adapters were drawn at random in each setup: make them equal, and give every B a non-zero value.
    _copy_adapter(models.network, "fake_score", network, "fake_score")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in models.network.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    _copy_adapter(models.network, T.STUDENT_ADAPTER, network, "default")
    _copy_adapter(models.network, "fake_score", network, "fake_score")
    return SimpleNamespace(accelerator=accelerator, models=models, ref_pm=ref_pm, ref_method=ref_method,
                           model=model, network=network, distiller=distiller, config=config, host=host)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 8, 32, generator=g)


def _student_grads(network, adapter):
    return {_renamed(n, adapter, "X"): p.grad.clone() for n, p in network.named_parameters()
            if f".{adapter}." in n and p.grad is not None}


def _adapter(network, adapter):
    return {_renamed(n, adapter, "X"): p.detach().clone() for n, p in network.named_parameters() if f".{adapter}." in n}


def _reference_step(h, step: int, latents, cond, optimizer):
    info = T._step_info(SEED, step, 0, 1, h.accelerator, None)
    torch.manual_seed(100 + step)
    result = h.ref_pm.hook.distill_loss(batch=Batch(latents=latents, cond=cond), step=info,
                                        host_loss=lambda: torch.tensor(0.0))
    if result.loss is not None:
        result.loss.backward()
    grads = _student_grads(h.models.network, T.STUDENT_ADAPTER)
    if result.loss is not None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    h.ref_pm.hook.distill_after_optimizer_step(step=info)
    metrics = {}
    for extra in h.ref_pm.hook.distill_metrics(step=info):
        metrics.update(extra)
    return result, grads, metrics


def _bridge_step(h, step: int, latents, cond, optimizer):
    """What SimpleTuner's trainer does around the distiller in one optimizer step (gradient accumulation 1)."""
    prepared = {"latents": latents, "encoder_hidden_states": cond, "noisy_latents": latents,
                "timesteps": torch.tensor([500.0, 500.0])}
    original_loss = sum(p.sum() for p in h.distiller.student_params) * 0.0 + 1.0  # stands in for its SFT loss
    torch.manual_seed(100 + step)
    loss, logs = h.distiller.compute_distill_loss(prepared, None, original_loss)
    loss, gen_logs = h.distiller.generator_loss_step(prepared, None, loss)
    logs.update(gen_logs)
    loss.backward()
    grads = _student_grads(h.network, "default")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    h.distiller.discriminator_step(prepared_batch=prepared)
    return loss, logs, grads


def test_loss_gradients_and_critic_match_the_reference_host(hosts):
    h = hosts
    # SimpleTuner's optimizer holds exactly the student's adapter: the fake score is filtered out of its list
    host_params = h.distiller.host_parameters(h.network.parameters())
    names = {n for n, p in h.network.named_parameters() if any(p is q for q in host_params)}
    assert names and all(".default." in n for n in names)
    assert len(names) == len(h.models.student_params)
    assert {n for n, p in h.network.named_parameters() if any(p is q for q in h.distiller.method_params)} == {
        n for n in dict(h.network.named_parameters()) if ".fake_score." in n}
    # the negative prompt came from SimpleTuner's encoder, stashed before the unload
    assert h.model.encoded == [NEGATIVE] and torch.equal(h.distiller.method.uncond, h.ref_method.uncond)

    ref_opt = torch.optim.AdamW(list(h.models.student_params.values()), lr=1e-3)
    st_opt = torch.optim.AdamW(host_params, lr=1e-3)
    for step in range(2):  # a generator step, then a critic-only step (generator_update_interval 2)
        latents, cond = _batch(step)
        ref, ref_grads, ref_metrics = _reference_step(h, step, latents, cond, ref_opt)
        loss, logs, st_grads = _bridge_step(h, step, latents, cond, st_opt)
        if step == 0:
            assert torch.equal(loss.detach(), ref.loss.detach()) and logs["dmd_loss"] == ref.logs["dmd_loss"]
            assert ref_grads.keys() == st_grads.keys() and len(st_grads) == len(h.models.student_params)
            for name in ref_grads:
                assert torch.equal(ref_grads[name], st_grads[name]), name
            assert any(g.abs().sum() > 0 for g in st_grads.values())
        else:  # no student update: a graph-valid zero, exact-zero student gradients
            assert ref.loss is None and float(loss.detach()) == 0.0 and "dmd_loss" not in logs
            assert all(torch.count_nonzero(g) == 0 for g in st_grads.values())
        # the critic's metrics were added to the very dict SimpleTuner merges into its log line
        assert logs["fake_score_loss"] == ref_metrics["fake_score_loss"]
        assert logs["dmd_exit_index"] == ref.logs["dmd_exit_index"]
        ref_fake, st_fake = _adapter(h.models.network, "fake_score"), _adapter(h.network, "fake_score")
        assert all(torch.equal(ref_fake[n], st_fake[n]) for n in ref_fake)
        # SimpleTuner always steps its optimizer; on the critic-only step the bridge's pre-step hook leaves the
        # student's gradients None, so its AdamW moves nothing (no momentum, no weight decay): the student stays
        # bit-identical to the reference host's, which skips the step
        ref_student, st_student = _adapter(h.models.network, T.STUDENT_ADAPTER), _adapter(h.network, "default")
        assert all(torch.equal(ref_student[n], st_student[n]) for n in ref_student), step
        assert h.distiller.skipped_student_steps == step
    assert h.distiller.global_step == 2
    assert all(st_opt.state[p]["step"] == 1 for p in host_params)  # one real step each: the generator step's


def test_checkpoint_round_trip_restores_the_method_state(hosts, tmp_path):
    h = hosts
    st_opt = torch.optim.AdamW(h.distiller.host_parameters(h.network.parameters()), lr=1e-3)
    latents, cond = _batch()
    _bridge_step(h, 0, latents, cond, st_opt)
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    h.distiller.on_save_checkpoint(1, str(folder))
    assert (folder / STATE_FILE).is_file() and (folder / "dmd" / "fake_score.safetensors").is_file()
    saved = _adapter(h.network, "fake_score")
    with torch.no_grad():  # move the live fake score away, then restore it from the checkpoint
        for p in h.distiller.method_params:
            p.add_(1.0)
    h.distiller.global_step = 99
    # SimpleTuner's `seed: 0` is a new int(time.time()) at every launch: the resumed run draws with the checkpoint's
    h.distiller.seed = h.distiller.run.seed = SEED + 1
    h.distiller.on_load_checkpoint(str(folder))
    restored = _adapter(h.network, "fake_score")
    assert all(torch.equal(saved[n], restored[n]) for n in saved)
    assert h.distiller.global_step == 1 and h.distiller.method.critic_updates == 1
    assert h.distiller.seed == SEED and h.distiller.method.run.seed == SEED
    assert h.distiller._step_info(0).generator.initial_seed() == step_generator(SEED, 1, 0).initial_seed()


def test_the_students_scheduler_lies_beside_its_lora_and_validation_seeds_its_renoising(hosts, tmp_path):
    """The method's scheduler is in ``output_dir/scheduler`` from set-up on (SimpleTuner writes the LoRA beside it)
    and in each checkpoint; the validation scheduler re-seeds its re-noising at every pipeline call with the seed
    SimpleTuner gives the call's initial noise (``validation_seed or seed or 0``; none under
    ``validation_randomize``)."""
    from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler

    h = hosts
    steps = list(h.distiller.pm.hook.distill_scheduler().config.few_step_timesteps)
    saved = FewStepFlowScheduler.from_pretrained(h.config["output_dir"], subfolder="scheduler")
    assert list(saved.config.few_step_timesteps) == steps
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    h.distiller.on_save_checkpoint(1, str(folder))
    assert FewStepFlowScheduler.from_pretrained(folder, subfolder="scheduler").config == saved.config

    assert h.distiller.get_scheduler().generator_seed == SEED  # no validation_seed: SimpleTuner's falls to seed
    h.config["validation_seed"] = 7
    scheduler = h.distiller.get_scheduler()
    assert scheduler.generator_seed == 7
    scheduler.set_timesteps(len(steps))  # a pipeline call's start
    assert scheduler.generator.initial_seed() == 7
    h.config["validation_randomize"] = True
    assert h.distiller.get_scheduler().generator_seed is None


def test_a_checkpoint_without_the_bridge_state_is_refused(hosts, tmp_path):
    from simpletuner_dmd.errors import UserError

    with pytest.raises(UserError, match=STATE_FILE):
        hosts.distiller.on_load_checkpoint(str(tmp_path))


def test_a_validation_step_count_the_student_was_not_trained_for_becomes_its_own_with_a_warning(hosts):
    from simpletuner_dmd.hosts.simpletuner.distiller import validation_steps_for

    scheduler = hosts.distiller.get_scheduler()
    assert validation_steps_for("dmd", scheduler, {"validation_num_inference_steps": 3}) == (None, None)
    assert validation_steps_for("dmd", scheduler, {"validation_num_inference_steps": 30,
                                                   "validation_disable": True}) == (None, None)
    assert validation_steps_for("dmd", scheduler, {"validation_num_inference_steps": 30}) == (
        3, "validation_num_inference_steps 30: the dmd student samples its 3 trained steps; SimpleTuner's validation "
           "samples 3")
    config = {**hosts.distiller.config, "validation_num_inference_steps": 30, "validation_disable": False}
    hosts.distiller._check_validation_steps(config)  # SimpleTuner's own config: its validation reads the count
    assert config["validation_num_inference_steps"] == 3


def test_an_lcm_student_validates_at_any_count_its_schedule_holds():
    from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler
    from simpletuner_dmd.hosts.simpletuner.distiller import validation_steps_for

    schedule = [float(t) for t in range(0, 1001, 20)]  # 50 skipping steps
    lcm = FewStepFlowScheduler(few_step_timesteps=[1000, 760, 500, 260], sampling_schedule=schedule,
                               consistency_timestep_scaling=10.0)
    assert validation_steps_for("lcm", lcm, {"validation_num_inference_steps": 8}) == (None, None)
    assert validation_steps_for("lcm", lcm, {"validation_num_inference_steps": 60}) == (
        4, "validation_num_inference_steps 60: the lcm student samples 1 to 50 steps; SimpleTuner's validation "
           "samples 4")
