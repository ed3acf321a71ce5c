"""Run under ``accelerate launch --num_processes N`` (or in a test's own process, ``main`` below): the reference host
on a config with ``job.py``'s ``Witness`` (each rank's final adapters) and ``Record`` (each rank's losses and the
method's metrics per step, the adapters as the run's first step found them, and the process's peak RSS)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from simpletuner_dmd import hookimpl
from simpletuner_dmd.hosts.reference.trainer import train
from tests.multiprocess.job import (
    Witness,  # the repository's root on PYTHONPATH, as the tests launch it
)


class Record:
    def __init__(self, out: Path):
        self.out = out
        self.losses: list[dict] = []
        self.metrics: list[dict] = []
        self.first = True

    @hookimpl
    def distill_setup(self, run):
        self.run = run

    def _rank(self) -> int:
        return self.run.accelerator.process_index

    @hookimpl(hookwrapper=True)
    def distill_loss(self, batch, step, host_loss):
        if self.first:  # the adapters as this run starts training (a resumed run: as its checkpoint left them)
            self.first = False
            weights = {n: p.detach().cpu().contiguous() for n, p in self.run.student.named_parameters()
                       if ".lora_" in n}
            save_file(weights, str(self.out / f"start-rank{self._rank()}.safetensors"))
        outcome = yield
        result = outcome.get_result()
        if result is not None:
            self.losses.append({"step": step.global_step, "micro": step.micro_step,
                                "loss": None if result.loss is None else float(result.loss.detach()),
                                **{k: float(v) for k, v in result.logs.items()}})

    @hookimpl(hookwrapper=True)
    def distill_metrics(self, step):
        outcome = yield
        merged: dict = {"step": step.global_step}
        for extra in outcome.get_result() or []:
            merged.update({k: float(v) for k, v in (extra or {}).items()})
        self.metrics.append(merged)
        rank = self._rank()
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        (self.out / f"record-rank{rank}.json").write_text(json.dumps(
            {"losses": self.losses, "metrics": self.metrics, "peak_rss_mib": peak_mib}))


def main(config: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    train(config, plugins=(Witness(out), Record(out)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
