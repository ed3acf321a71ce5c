"""Run under ``accelerate launch --num_processes 2``: the reference host on a config, plus a plugin that records what
each process saw and, at the end, its own copy of every trained weight (student and fake-score adapters)."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from simpletuner_dmd import hookimpl
from simpletuner_dmd.hosts.reference.trainer import train


class Witness:
    def __init__(self, out: Path):
        self.out = out
        self.seen: list[dict] = []

    @hookimpl
    def distill_setup(self, run):
        self.run = run

    @hookimpl(tryfirst=True)
    def distill_loss(self, batch, step, host_loss):
        # the seed of the generator every process must share, and this process's data
        self.seen.append({"step": step.global_step, "micro": step.micro_step,
                          "generator_seed": step.generator.initial_seed(),
                          "latents_sum": float(batch.latents.sum())})

    @hookimpl
    def distill_metrics(self, step):
        rank = self.run.accelerator.process_index
        weights = {n: p.detach().cpu().contiguous() for n, p in self.run.student.named_parameters() if ".lora_" in n}
        # DMD2's classifier head, when the GAN term is on: it lives outside the DDP wrapper (the method averages its
        # gradient itself), and a plugin cannot reach another plugin's state, so it is found among live objects.
        heads = [o for o in gc.get_objects() if type(o).__name__ == "GANHead"]
        for i, head in enumerate(heads):
            weights.update({f"gan_head{i}.{n}": p.detach().cpu().contiguous() for n, p in head.named_parameters()})
        save_file(weights, str(self.out / f"weights-rank{rank}.safetensors"))
        (self.out / f"seen-rank{rank}.json").write_text(json.dumps(self.seen))


if __name__ == "__main__":
    config, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    train(config, plugins=(Witness(out),))
