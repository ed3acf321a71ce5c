"""Context parallelism in the reference host (``context_parallel_size``): one sample's tokens split over 2 CPU
processes (gloo, through ``accelerate launch``; diffusers' Ulysses with ``cpu_shims.diffusers_context_parallel_on_cpu``).

- Equivalence: with ``context_parallel_size: 2`` on 2 processes (one data-parallel group) a DMD run — student,
  teacher and fake-score passes, forward and backward, gradient accumulation 2, gradient checkpointing — gives each
  rank the single-process run's losses, the critic's metrics, the trained adapters (student and fake score) and its
  checkpoints, within 1e-5 absolute + 1e-4 relative (the split changes only the order of the sums: the measured
  worst difference is printed). The same with ``fsdp_enable`` on the same 2 processes (FSDP2 + context parallelism),
  with DMD v1's regression term on (its ODE pairs made at set-up, drawn by the data-parallel rank).
- Resume: the context-parallel run's checkpoint resumed on 1 process (one data-parallel group is one process's
  computation) gives the uninterrupted context-parallel run's next checkpoint within the same tolerance (every tensor
  file, process 0's random state included; the counters exactly).
- Each family's network (``wan``, ``wan-i2v``, ``wan2.2-ti2v``; 2 processes through ``torch.distributed.run``): one
  call through the family's ``predict_flow`` with every parameter trainable gives the unsplit output (measured
  difference 0) and, summed over the processes, the unsplit gradients (relative difference below 2e-7); a sample of 3
  tokens stops with one line.
- Two groups (opt-in, ``SIMPLETUNER_DMD_FOUR_PROCESSES=1``: 4 processes): ``context_parallel_size: 2`` on 4
  processes equals 2 DDP processes (group g against process g), within the same tolerance.
- Refusals: ``validate-config`` refuses, one line each, a family without a ``_cp_plan`` (by name), a full student,
  DMD2's GAN term and a full fake score, DCM, a degree that does not divide the heads or the validation sample's
  tokens; the trainer refuses a process count the degree does not divide.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from simpletuner_dmd.errors import ConfigError, UserError
from simpletuner_dmd.hosts.reference.context_parallel import layout
from simpletuner_dmd.hosts.reference.run_config import validate_config
from simpletuner_dmd.plugins import get_plugin_manager
from tests.multiprocess import launch
from tests.test_fsdp import _config, _record, _tensor_files

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ATOL, RTOL = 1e-5, 1e-4

COMMON = {"base_model_precision": "no_change", "max_train_steps": 3, "gradient_accumulation_steps": 2,
          "checkpoint_step_interval": 2, "checkpoints_total_limit": None, "validation_step_interval": 0,
          "resume_from_checkpoint": "latest"}
# DMD v1's regression term too: the teacher's ODE pairs made at set-up (before the base is split or sharded), and
# each micro-batch's pairs drawn from a stream seeded by the data-parallel rank (the same on both ranks of a group)
REGRESSION = {**json.loads((REPO / "config_examples/tiny-wan-dmd/config.json").read_text())["distillation_config"],
              "regression_loss_weight": 1.0, "regression_latent_shape": [16, 3, 4, 4], "regression_num_pairs": 4,
              "regression_teacher_steps": 4}


def _launch(config: Path, witness: Path, processes: int = 2) -> str:
    return launch("cp_job.py", config, witness, processes)


def _in_process(config: Path, witness: Path) -> None:
    from tests.multiprocess.fsdp_job import main

    threads = torch.get_num_threads()
    try:
        main(config, witness)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_wan, tiny_dataset):
    """The single-process run (in this process): 3 steps, checkpoints at 2 and 3."""
    root = tmp_path_factory.mktemp("cp")
    _in_process(_config(root, tiny_wan, tiny_dataset, "single", **COMMON), root / "single" / "witness")
    return root, root / "single"


@pytest.fixture(scope="module")
def cp_run(single_run, tiny_wan, tiny_dataset):
    root = single_run[0]
    logs = _launch(_config(root, tiny_wan, tiny_dataset, "cp", context_parallel_size=2, **COMMON),
                   root / "cp" / "witness")
    return root / "cp", logs


def _compare_with_single(folder: Path, single: Path) -> float:
    """Every rank of the 2-process run against the single process: losses, metrics, adapters, checkpoints; returns
    the largest difference."""
    worst = 0.0
    b = _record(single / "witness", 0)
    wb = load_file(str(single / "witness" / "weights-rank0.safetensors"))
    for rank in (0, 1):
        a = _record(folder / "witness", rank)
        assert len(a["losses"]) == len(b["losses"]) == 6  # 3 steps x 2 micro-batches
        for x, y in zip(a["losses"] + a["metrics"], b["losses"] + b["metrics"]):
            assert x.keys() == y.keys()
            for key in x:
                if key.startswith("passes/") or key in ("step", "micro"):
                    assert x[key] == y[key], (rank, key)
                elif x[key] is None or y[key] is None:
                    assert x[key] is y[key], (rank, key)
                else:
                    assert abs(x[key] - y[key]) <= ATOL + RTOL * abs(y[key]), (rank, key, x[key], y[key])
                    worst = max(worst, abs(x[key] - y[key]))
        wa = load_file(str(folder / "witness" / f"weights-rank{rank}.safetensors"))
        assert wa.keys() == wb.keys() and any(".fake_score." in k for k in wa) and any(".student." in k for k in wa)
        for name in wa:
            assert torch.allclose(wa[name], wb[name], atol=ATOL, rtol=RTOL), name
            worst = max(worst, float((wa[name] - wb[name]).abs().max()))
    for step in (2, 3):
        fa = _tensor_files(folder / "out" / f"checkpoint-{step}")
        fb = _tensor_files(single / "out" / f"checkpoint-{step}")
        assert {k for k in fa if not k.startswith("rng-")} == {k for k in fb if not k.startswith("rng-")}
        for name in fb:
            if name.startswith("rng-"):
                continue
            for key in fb[name]:
                assert torch.allclose(fa[name][key].double(), fb[name][key].double(), atol=ATOL, rtol=RTOL), (name, key)
    return worst


@pytest.mark.slow
def test_context_parallel_equals_one_process(single_run, cp_run):
    folder, logs = cp_run
    assert "each sample's tokens split over 2 processes (Ulysses), 1 data-parallel group(s)" in logs
    worst = _compare_with_single(folder, single_run[1])
    # the adapters are the same on both ranks, and training moved them
    w0 = load_file(str(folder / "witness" / "weights-rank0.safetensors"))
    w1 = load_file(str(folder / "witness" / "weights-rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(w0[k].abs().sum() > 0 for k in w0 if ".lora_B.student." in k)
    assert any(w0[k].abs().sum() > 0 for k in w0 if ".lora_B.fake_score." in k)
    # both ranks of the group took the same batches with the same shared draws
    seen = [json.loads((folder / "witness" / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]
    assert (folder / "out" / "pytorch_lora_weights.safetensors").is_file()
    print(f"context parallel 2 vs one process, largest difference of a loss, metric or adapter weight: {worst:.3g}")


@pytest.mark.slow
def test_fsdp2_with_context_parallel_equals_one_process(single_run, tiny_wan, tiny_dataset):
    # with the regression term (its pairs drawn per data-parallel rank: by process they differed on rank 1)
    root = single_run[0]
    _in_process(_config(root, tiny_wan, tiny_dataset, "single-regression", distillation_config=REGRESSION, **COMMON),
                root / "single-regression" / "witness")
    config = _config(root, tiny_wan, tiny_dataset, "fsdp-cp", context_parallel_size=2, fsdp_enable=True,
                     distillation_config=REGRESSION, **COMMON)
    logs = _launch(config, root / "fsdp-cp" / "witness")
    assert "the frozen base sharded over 2 processes (FSDP2)" in logs and "split over 2 processes" in logs
    assert all("regression_loss" in x for x in _record(root / "fsdp-cp" / "witness", 1)["losses"] if x["loss"])
    worst = _compare_with_single(root / "fsdp-cp", root / "single-regression")
    print(f"FSDP2 + context parallel 2 vs one process, largest difference: {worst:.3g}")


@pytest.mark.slow
def test_a_context_parallel_checkpoint_resumes_on_one_process(cp_run, tiny_wan, tiny_dataset, capsys):
    # one process is the same computation as the context-parallel group (one data-parallel group, rank 0's random
    # state), so the resumed run's next checkpoint is the uninterrupted context-parallel run's, within the tolerance
    folder = cp_run[0]
    root = folder.parent
    shutil.copytree(folder / "out", root / "cp-resumed" / "out", ignore=shutil.ignore_patterns("checkpoint-3"))
    _in_process(_config(root, tiny_wan, tiny_dataset, "cp-resumed", context_parallel_size=1, **COMMON),
                root / "cp-resumed" / "witness")
    text = capsys.readouterr()
    assert "at step 2" in text.out + text.err
    a = _tensor_files(folder / "out" / "checkpoint-3")
    b = _tensor_files(root / "cp-resumed" / "out" / "checkpoint-3")
    assert a.keys() - {"rng-1.safetensors"} == b.keys()
    assert "dmd/fake_score_optimizer.safetensors" in b and "optimizer.safetensors" in b
    for name in b:
        for key in b[name]:
            assert torch.allclose(a[name][key].double(), b[name][key].double(), atol=ATOL, rtol=RTOL), (name, key)
    for name in ("trainer_state.json", "dmd/state.json"):
        assert (folder / "out" / "checkpoint-3" / name).read_text() == (
            root / "cp-resumed" / "out" / "checkpoint-3" / name).read_text()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SIMPLETUNER_DMD_FOUR_PROCESSES") != "1",
                    reason="4 processes on this CI's 2 cores take about 90 s: set SIMPLETUNER_DMD_FOUR_PROCESSES=1")
def test_two_context_parallel_groups_equal_two_ddp_processes(tmp_path, tiny_wan, tiny_dataset):
    # 4 processes in 2 groups of 2: group g takes DDP process g's batches and random streams, and the adapters'
    # gradients (summed over a group, averaged over the groups) are DDP's mean over its 2 processes
    _launch(_config(tmp_path, tiny_wan, tiny_dataset, "ddp", **COMMON), tmp_path / "ddp" / "witness")
    logs = _launch(_config(tmp_path, tiny_wan, tiny_dataset, "cp", context_parallel_size=2, **COMMON),
                   tmp_path / "cp" / "witness", processes=4)
    assert "2 data-parallel group(s)" in logs
    worst = 0.0
    for rank in range(4):
        a, b = _record(tmp_path / "cp" / "witness", rank), _record(tmp_path / "ddp" / "witness", rank // 2)
        assert len(a["losses"]) == len(b["losses"]) and len(a["metrics"]) == len(b["metrics"])
        for x, y in zip(a["losses"] + a["metrics"], b["losses"] + b["metrics"]):
            for key in x:
                if key in ("step", "micro") or key.startswith("passes/") or x[key] is None or y[key] is None:
                    assert x[key] == y[key], (rank, key)
                else:
                    assert abs(x[key] - y[key]) <= ATOL + RTOL * abs(y[key]), (rank, key, x[key], y[key])
                    worst = max(worst, abs(x[key] - y[key]))
        wa = load_file(str(tmp_path / "cp" / "witness" / f"weights-rank{rank}.safetensors"))
        wb = load_file(str(tmp_path / "ddp" / "witness" / f"weights-rank{rank // 2}.safetensors"))
        for name in wb:
            assert torch.allclose(wa[name], wb[name], atol=ATOL, rtol=RTOL), name
            worst = max(worst, float((wa[name] - wb[name]).abs().max()))
    print(f"2 context-parallel groups of 2 vs 2 DDP processes, largest difference: {worst:.3g}")


@pytest.mark.slow
def test_each_wan_familys_network_call_split_equals_unsplit(tmp_path):
    # one call through the family's predict_flow, every parameter trainable: the split network's output equals the
    # unsplit one's, and its gradients summed over the 2 processes (ReplicatedAdapters) equal the unsplit ones
    out = tmp_path / "network.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(HERE / "multiprocess" / "cp_network.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    refused = report.pop("refused")
    assert refused.startswith("context_parallel_size 2 must divide the sample's 3 tokens"), refused
    assert set(report) == {"wan", "wan-i2v", "wan2.2-ti2v"}
    for family, r in report.items():
        assert r["split"] and r["parameters"] > 60, (family, r)
        assert r["output"] <= ATOL and r["gradient"] <= RTOL, (family, r)  # gradient: relative to the largest
    print("split vs unsplit network call:", report)


# --------------------------------------------------------------------------- refusals


def _raw(**overrides) -> dict:
    raw = json.loads((REPO / "config_examples/tiny-wan-dmd/config.json").read_text())
    raw.update(base_model_precision="no_change", context_parallel_size=2)
    raw.update(overrides)
    return raw


def _problems(raw: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw, get_plugin_manager(), **{"check_paths": False, **kwargs})
    return [p for p in info.value.problems if "context_parallel_size" in p]


def test_context_parallel_validates_for_wan():
    rc = validate_config(_raw(), get_plugin_manager(), check_paths=False)
    assert rc.host["context_parallel_size"] == 2


@pytest.mark.parametrize("family", ["wan-causal", "wan2.2"])
def test_a_family_without_a_cp_plan_is_refused_by_name(family):
    lines = _problems(_raw(model_family=family))
    assert len(lines) == 1 and f"the {family} family" in lines[0] and "_cp_plan" in lines[0], lines


def test_a_full_student_is_refused():
    lines = _problems(_raw(model_type="full"))
    assert any("needs model_type lora" in line for line in lines), lines


def test_dmd2s_gan_term_and_a_full_fake_score_are_refused():
    raw = _raw()
    raw["distillation_config"] = {**raw["distillation_config"], "gan_loss_weight": 0.5}
    lines = _problems(raw)
    assert len(lines) == 1 and "gan_loss_weight" in lines[0], lines
    raw["distillation_config"] = {**raw["distillation_config"], "gan_loss_weight": 0.0, "fake_score_type": "full"}
    lines = _problems(raw)
    assert len(lines) == 1 and "fake_score_type" in lines[0], lines


def test_dcm_is_refused():
    lines = _problems(_raw(distillation_method="dcm", distillation_config={}))
    assert len(lines) == 1 and "DCM" in lines[0], lines


def test_the_degree_is_checked_against_the_heads_and_the_tokens(tmp_path, tiny_wan, tiny_dataset):
    # the tiny Wan has 2 attention heads; a 32x32 sample of 5 frames has 2 latent frames of 2x2 tokens
    base = json.loads(_config(tmp_path, tiny_wan, tiny_dataset, "v").read_text())
    base.update(base_model_precision="no_change", validation_resolution="32x32", validation_num_video_frames=5)
    validate_config({**base, "context_parallel_size": 2}, get_plugin_manager())
    lines = _problems({**base, "context_parallel_size": 4}, check_paths=True)
    assert len(lines) == 1 and "2 attention heads" in lines[0], lines
    lines = _problems({**base, "context_parallel_size": 3}, check_paths=True)
    assert len(lines) == 2 and any("8 latent tokens" in line and "32x32x5" in line for line in lines), lines


def test_a_launch_on_one_process_is_refused_before_anything_loads(tmp_path, tiny_wan, tiny_dataset):
    from simpletuner_dmd.hosts.reference.trainer import train

    config = _config(tmp_path, tiny_wan, tiny_dataset, "one", context_parallel_size=2, **COMMON)
    with pytest.raises(UserError, match=r"^context_parallel_size 2 must divide the number of processes \(1\)"):
        train(config)
    assert not (tmp_path / "cache").exists()  # refused before the data was encoded


def test_the_process_count_must_be_a_multiple_of_the_degree():
    accelerator = SimpleNamespace(num_processes=3, process_index=1)
    with pytest.raises(UserError, match=r"context_parallel_size 2 must divide the number of processes \(3\)"):
        layout({"context_parallel_size": 2}, accelerator)
    # 4 processes in groups of 2: ranks 0-1 are data-parallel group 0, ranks 2-3 group 1
    spread = layout({"context_parallel_size": 2}, SimpleNamespace(num_processes=4, process_index=3))
    assert (spread.data_parallel_rank, spread.data_parallel_size) == (1, 2)
    assert layout({}, SimpleNamespace(num_processes=2, process_index=1)).data_parallel_rank == 1
