"""Test-only: put on PYTHONPATH for ``simpletuner train`` runs, so every process its ``accelerate launch`` starts gets
the CPU shims (``cpu_shims.py``). With ``SIMPLETUNER_DMD_TEST_WITNESS=DIR`` each process also writes the LoRA weights
of SimpleTuner's trained network to ``DIR/weights-rank<R>.safetensors`` once ``Trainer.train()`` has returned, so a
test can compare the processes."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_shims  # noqa: E402

cpu_shims.apply()
cpu_shims.stringify_tensorboard_config()

if os.environ.get("SIMPLETUNER_DMD_TEST_WITNESS"):
    from simpletuner_dmd.hosts.simpletuner import autoload

    apply = autoload.apply

    def apply_with_witness():
        served = apply()
        from simpletuner.helpers.training.trainer import Trainer

        train = Trainer.train
        if getattr(train, "_witness", False):
            return served

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
        return served

    autoload.apply = apply_with_witness
