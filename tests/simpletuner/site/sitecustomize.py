"""Test-only: put on PYTHONPATH for ``simpletuner train`` runs, so every process its ``accelerate launch`` starts gets
the CPU shims (``cpu_shims.py``). With ``SIMPLETUNER_DMD_TEST_WITNESS=DIR`` each process also writes the LoRA weights
of SimpleTuner's trained network to ``DIR/weights-rank<R>.safetensors`` once ``Trainer.train()`` has returned, so a
test can compare the processes. With ``SIMPLETUNER_DMD_TEST_FLOW_CHECK=1`` the bridge's ``compute_distill_loss`` first
calls the family's ``predict_flow`` on SimpleTuner's trained network with SimpleTuner's own noisy latents, timesteps
and condition (through the family's ``from_simpletuner_batch``), and prints how far that is from the prediction
SimpleTuner's ``model_predict`` made for the same batch: ``[flow-check] … max_abs_diff=…`` (with ``lora_dropout: 0``).
With ``SIMPLETUNER_DMD_TEST_VALIDATION_RECORD=DIR`` each validation pipeline call's arguments and output are written
to ``DIR`` (the stock-pipeline reproductions). With ``SIMPLETUNER_DMD_TEST_BASE_WITNESS=DIR`` the trained
network's weights after ``init_precision`` (the base as training will use it, before any adapter) go to
``DIR/base.safetensors``.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_shims  # noqa: E402

cpu_shims.apply()
cpu_shims.stringify_tensorboard_config()
cpu_shims.ltxvideo_text_embed_scheduler()


def after_apply(install) -> None:
    """Run ``install()`` (the test's own wrappers on SimpleTuner's classes) once the plugin's import hook has applied
    its take-over points, i.e. once SimpleTuner's trainer module has loaded."""
    from simpletuner_dmd.hosts.simpletuner import autoload

    apply = autoload.apply

    def apply_then_install():
        served = apply()
        install()
        return served

    autoload.apply = apply_then_install


if os.environ.get("SIMPLETUNER_DMD_TEST_WITNESS"):

    def install_witness():
        from simpletuner.helpers.training.trainer import Trainer

        train = Trainer.train
        if getattr(train, "_witness", False):
            return

        def train_then_write(self, *args, **kwargs):
            result = train(self, *args, **kwargs)
            from safetensors.torch import save_file

            folder = Path(os.environ["SIMPLETUNER_DMD_TEST_WITNESS"])
            folder.mkdir(parents=True, exist_ok=True)
            network = self.model.get_trained_component(unwrap_model=True)
            weights = {n: p.detach().cpu().contiguous() for n, p in network.named_parameters() if "lora_" in n}
            save_file(weights, str(folder / f"weights-rank{os.environ.get('RANK', '0')}.safetensors"))
            return result

        train_then_write._witness = True
        Trainer.train = train_then_write

    after_apply(install_witness)

if os.environ.get("SIMPLETUNER_DMD_TEST_FLOW_CHECK"):
    import torch

    from simpletuner_dmd.hosts.simpletuner import distiller as _distiller

    _compute = _distiller.PluginDistiller.compute_distill_loss

    def compute_distill_loss_checked(self, prepared_batch, model_output, original_loss):
        pred = model_output.get("model_prediction") if isinstance(model_output, dict) else None
        if torch.is_tensor(pred) and "noisy_latents" in prepared_batch:
            with torch.no_grad():
                # the noisy latents in the family's layout; the condition from the batch as the method gets it
                x_t, _ = _distiller.from_simpletuner_batch(
                    self.family, {**prepared_batch, "latents": prepared_batch["noisy_latents"]})
                _, cond = _distiller.from_simpletuner_batch(self.family, prepared_batch)
                network = self.model.get_trained_component(unwrap_model=False)
                # SimpleTuner's timesteps are 1000·σ (Flux rescales the batch's entry in place during its forward)
                t = prepared_batch["sigmas"].reshape(-1).float() * 1000
                ours = self.family.predict_flow(network, x_t, t, cond)
                # SimpleTuner 3.x has no direction helper: its flow-matching predictions are all noise-ward
                to_flow = getattr(self.model, "prediction_to_noiseward_flow", lambda prediction: prediction)
                theirs = to_flow(pred.detach())
            diff = (ours.reshape(pred.shape).float() - theirs.float()).abs().max().item()
            shape = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
            print(f"[flow-check] latents {tuple(x_t.shape)} cond {shape} max_abs_diff={diff:.3g} "
                  f"max_abs_pred={pred.detach().abs().max().item():.3g}", flush=True)
        return _compute(self, prepared_batch, model_output, original_loss)

    _distiller.PluginDistiller.compute_distill_loss = compute_distill_loss_checked

if os.environ.get("SIMPLETUNER_DMD_TEST_VALIDATION_CHECK"):
    # Each of SimpleTuner's validations prints whether the student's weights (the trained network's parameters that
    # SimpleTuner's own optimizer trains: the adapter "default") are bit-identical after it to before it, and each EMA
    # swap whether the weights validated were the EMA's (they differ from the student's once the EMA has moved).
    import hashlib

    def _student_digest(model) -> str:
        network = model.get_trained_component(unwrap_model=True)
        digest = hashlib.sha256()
        for name, p in sorted(network.named_parameters()):
            if ".default." in name:
                digest.update(name.encode())
                digest.update(p.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def install_validation_check():
        from simpletuner.helpers.training.validation import Validation

        run = Validation.run_validations
        if getattr(run, "_checked", False):
            return

        def run_validations(self, *args, **kwargs):
            before = _student_digest(self.model)
            self._dmd_test_before = before
            result = run(self, *args, **kwargs)
            after = _student_digest(self.model)
            print(f"[validation-check] step={kwargs.get('step')} student_unchanged={before == after}", flush=True)
            return result

        enable = Validation.enable_ema_for_inference

        def enable_ema_for_inference(self, *args, **kwargs):
            result = enable(self, *args, **kwargs)
            if self.ema_enabled:
                swapped = _student_digest(self.model) != getattr(self, "_dmd_test_before", None)
                print(f"[ema-check] swapped={swapped}", flush=True)
            return result

        run_validations._checked = True
        Validation.run_validations = run_validations
        Validation.enable_ema_for_inference = enable_ema_for_inference

    after_apply(install_validation_check)

if os.environ.get("SIMPLETUNER_DMD_TEST_VALIDATION_RECORD"):
    # Each validation pipeline call of SimpleTuner, recorded in the folder the variable names: its scalar arguments
    # (the prompt and negative prompt texts, steps, size, guidance, frames), the seed of its generator, which keyword
    # tensors it got, the scheduler's class and its generator_seed, its conditioning image (saved as image-<n>.png), as
    # one JSON line in calls.jsonl; and its output as
    # SimpleTuner received it (8-bit images or video frames, before any PNG or mp4 encoding) in output-<n>.npy — so a
    # test can run the stock pipeline with the same arguments and compare.
    import json

    def install_validation_record():
        import numpy as np
        import torch
        from simpletuner.helpers.training.validation import Validation

        folder = Path(os.environ["SIMPLETUNER_DMD_TEST_VALIDATION_RECORD"])
        folder.mkdir(parents=True, exist_ok=True)
        filter_kwargs = Validation._filter_pipeline_kwargs_for_call
        extract = Validation._extract_pipeline_media
        if getattr(filter_kwargs, "_recorded", False):
            return

        def recorded_filter(self, pipeline, kwargs):
            entry = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))}
            generator = kwargs.get("generator")
            entry["generator_seed"] = generator.initial_seed() if isinstance(generator, torch.Generator) else None
            entry["tensors"] = sorted(k for k, v in kwargs.items() if torch.is_tensor(v))
            entry["pipeline"] = type(pipeline).__name__
            entry["scheduler"] = type(pipeline.scheduler).__name__
            entry["scheduler_generator_seed"] = getattr(pipeline.scheduler, "generator_seed", None)
            image = kwargs.get("image")
            if hasattr(image, "save"):  # the conditioning image as the pipeline gets it (I2V's first frame)
                entry["image"] = str(folder / f"image-{len(list(folder.glob('image-*.png')))}.png")
                image.save(entry["image"])
            with open(folder / "calls.jsonl", "a") as out:
                out.write(json.dumps(entry) + "\n")
            return filter_kwargs(self, pipeline, kwargs)

        def recorded_extract(pipeline_result, **kwargs):
            media = extract(pipeline_result, **kwargs)
            if media is not None:
                frames = media[0] if isinstance(media, (list, tuple)) and isinstance(media[0], (list, tuple)) else None
                array = (np.stack([np.asarray(f.convert("RGB")) for f in frames]) if frames is not None
                         else np.asarray(media[0].convert("RGB")) if hasattr(media[0], "convert")
                         else np.asarray(media[0]))
                np.save(folder / f"output-{len(list(folder.glob('output-*.npy')))}.npy", array)
            return media

        recorded_filter._recorded = True
        Validation._filter_pipeline_kwargs_for_call = recorded_filter
        Validation._extract_pipeline_media = staticmethod(recorded_extract)

    after_apply(install_validation_record)

if os.environ.get("SIMPLETUNER_DMD_TEST_CALLS"):
    # Every call of SimpleTuner's trained network while a plugin method runs, as one JSON line in the file the variable
    # names (per process): the keyword arguments' shapes, the guidance input's values, the peft adapters active, and
    # whether it ran under no_grad — so a test can see what each network call of the method was given.
    import json

    import torch

    def _describe(value):
        if torch.is_tensor(value):
            return {"shape": list(value.shape), "dtype": str(value.dtype)}
        return type(value).__name__

    def install_call_log():
        from simpletuner_dmd.hosts.simpletuner import distiller as _distiller

        init = _distiller.PluginDistiller.__init__
        if getattr(init, "_logged", False):
            return
        path = Path(f"{os.environ['SIMPLETUNER_DMD_TEST_CALLS']}.rank{os.environ.get('RANK', '0')}.jsonl")

        def init_then_log(self, *args, **kwargs):
            init(self, *args, **kwargs)
            network = self.model.get_trained_component(unwrap_model=True)

            def record(module, args, kwargs):
                entry = {k: _describe(v) for k, v in kwargs.items() if v is not None}
                guidance = kwargs.get("guidance")
                if torch.is_tensor(guidance):
                    entry["guidance_values"] = sorted({round(float(g), 4) for g in guidance.reshape(-1)})
                entry["adapters"] = sorted(getattr(module, "active_adapters", lambda: [])()
                                           if callable(getattr(module, "active_adapters", None)) else [])
                entry["adapters_enabled"] = any(getattr(m, "_disable_adapters", True) is False
                                                for m in module.modules() if hasattr(m, "_disable_adapters"))
                entry["grad"] = torch.is_grad_enabled()
                with open(path, "a") as out:
                    out.write(json.dumps(entry) + "\n")

            network.register_forward_pre_hook(record, with_kwargs=True)

        init_then_log._logged = True
        _distiller.PluginDistiller.__init__ = init_then_log

    after_apply(install_call_log)

if os.environ.get("SIMPLETUNER_DMD_TEST_FAMILY"):
    # The bridge serves the run with the plugin family this names (the equivalence tests: SimpleTuner's own model
    # through the generic family, where a dedicated family would be picked).
    def install_family_choice():
        from simpletuner_dmd.hosts.simpletuner import distiller as _distiller
        from simpletuner_dmd.plugins import get_family_class

        def chosen(pm, model_family, model_flavour=None):
            return get_family_class(pm, os.environ["SIMPLETUNER_DMD_TEST_FAMILY"])

        _distiller.simpletuner_family_class = chosen

    after_apply(install_family_choice)

if os.environ.get("SIMPLETUNER_DMD_TEST_BASE_WITNESS"):
    # After SimpleTuner's first `init_precision` with a model (the base loaded, quantised when asked, no adapter yet; a
    # later call, for the EMA, comes after PEFT), the trained network's weights go to DIR/base.safetensors: what the
    # teacher and the students' base are (teacher_loras).
    def install_base_witness():
        from simpletuner.helpers.training.trainer import Trainer

        init_precision = Trainer.init_precision
        if getattr(init_precision, "_witness", False):
            return

        def init_precision_then_write(self, *args, **kwargs):
            result = init_precision(self, *args, **kwargs)
            folder = Path(os.environ["SIMPLETUNER_DMD_TEST_BASE_WITNESS"])
            loaded = getattr(self, "model", None) is not None and getattr(self.model, "model", None) is not None
            if loaded and not (folder / "base.safetensors").exists():  # its first call after the base loaded
                from safetensors.torch import save_file

                folder.mkdir(parents=True, exist_ok=True)
                network = self.model.get_trained_component()
                save_file({n: p.detach().float().cpu().contiguous() for n, p in network.named_parameters()},
                          str(folder / "base.safetensors"))
            return result

        init_precision_then_write._witness = True
        Trainer.init_precision = init_precision_then_write

    after_apply(install_base_witness)
