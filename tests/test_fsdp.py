"""FSDP2 in the reference host (``fsdp_enable``): the frozen base sharded over 2 CPU processes (gloo, through
``accelerate launch``), the adapters replicated.

- Equivalence: 2 processes with FSDP2 run DMD steps whose losses (every rank, every micro-batch, the critic's too) and
  trained adapters (student and fake score) equal the 2-process DDP run's on the same data split. The comparison is
  with DDP, not with one process on the combined batch, because the two runs then draw the same per-process noise
  from the same streams: any difference is the sharding's. With DMD2's GAN term too (its head outside both wrappers). Tolerance: 1e-6 absolute + 1e-5 relative (it measured 0:
  the sharded base is gathered whole before each block's call, and the adapters' gradients are averaged as DDP does).
- Resume: a 2-process FSDP2 checkpoint (and a DDP one), resumed on 2 processes, gives the uninterrupted run's next
  checkpoint bit for bit (every tensor file, each process's random state, the counters); resumed on 1 process it starts from exactly the checkpoint's adapters
  and optimizer states and trains on (one process cannot repeat two processes' steps: another batch split, other
  noise streams, so its later steps are not compared).
- ``validate-config`` refuses FSDP2 over an int8-quanto base in one line, and a full student (no frozen base).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simpletuner_dmd.errors import ConfigError
from simpletuner_dmd.hosts.reference.run_config import validate_config
from simpletuner_dmd.plugins import get_plugin_manager
from tests.multiprocess import launch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ATOL, RTOL = 1e-6, 1e-5

COMMON = {"base_model_precision": "no_change", "max_train_steps": 4, "gradient_accumulation_steps": 2,
          "checkpoint_step_interval": 2, "checkpoints_total_limit": None, "validation_step_interval": 0,
          "resume_from_checkpoint": "latest"}


def _config(folder: Path, tiny_wan: Path, tiny_dataset: Path, name: str, **overrides) -> Path:
    """A config shaped like ``conftest.job``'s: the data and its cache in ``folder`` (shared by every run of the
    module, so every run sees the same items in the same order), the output in ``folder/<name>``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if not data.exists():
        shutil.copytree(tiny_dataset, data)
    backends = json.loads((REPO / "config_examples/tiny-wan-dmd/multidatabackend.json").read_text())
    for b in backends:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(data)
        b["cache_dir"] = str(folder / "cache" / b["id"])
    (folder / "backends.json").write_text(json.dumps(backends))
    base = json.loads((REPO / "config_examples/tiny-wan-dmd/config.json").read_text())
    base.update(pretrained_model_name_or_path=str(tiny_wan), pretrained_t5_model_name_or_path=str(tiny_wan),
                data_backend_config=str(folder / "backends.json"), output_dir=str(folder / name / "out"),
                report_to="none", validation_num_video_frames=5, validation_resolution="32x32")
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**base, **overrides}))
    return path


def _launch(config: Path, witness: Path, processes: int = 2) -> str:
    return launch("fsdp_job.py", config, witness, processes)


def _record(witness: Path, rank: int) -> dict:
    return json.loads((witness / f"record-rank{rank}.json").read_text())


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= ATOL + RTOL * abs(b)


def _tensor_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(folder)): load_file(str(p)) for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_wan, tiny_dataset):
    """The uninterrupted 2-process FSDP2 run: 4 steps, checkpoints at 2 and 4; returns the shared folder and the
    run's own (``out``, ``witness``)."""
    root = tmp_path_factory.mktemp("fsdp")
    config = _config(root, tiny_wan, tiny_dataset, "straight", fsdp_enable=True, fsdp_version=2, **COMMON)
    logs = _launch(config, root / "straight" / "witness")
    return root, root / "straight", logs


@pytest.fixture(scope="module")
def ddp_run(fsdp_run, tiny_wan, tiny_dataset):
    """The same run with DDP (no fsdp_enable), on the same data."""
    root = fsdp_run[0]
    logs = _launch(_config(root, tiny_wan, tiny_dataset, "ddp", **COMMON), root / "ddp" / "witness")
    return root, root / "ddp", logs


@pytest.mark.slow
def test_fsdp2_equals_ddp_on_two_processes(fsdp_run, ddp_run):
    root, folder, logs = fsdp_run
    assert "the frozen base sharded over 2 processes (FSDP2)" in logs
    ddp = ddp_run[1]

    worst = 0.0
    for rank in (0, 1):
        a, b = _record(folder / "witness", rank), _record(ddp / "witness", rank)
        assert len(a["losses"]) == len(b["losses"]) == 8  # 4 steps x 2 micro-batches
        for x, y in zip(a["losses"] + a["metrics"], b["losses"] + b["metrics"]):
            assert x.keys() == y.keys()
            for key in x:
                if key.startswith("passes/") or key in ("step", "micro"):
                    assert x[key] == y[key], (rank, key)
                    continue
                assert _close(x[key], y[key]), (rank, key, x[key], y[key])
                if x[key] is not None:
                    worst = max(worst, abs(x[key] - y[key]))
        wa = load_file(str(folder / "witness" / f"weights-rank{rank}.safetensors"))
        wb = load_file(str(ddp / "witness" / f"weights-rank{rank}.safetensors"))
        assert wa.keys() == wb.keys() and any(".fake_score." in k for k in wa) and any(".student." in k for k in wa)
        for name in wa:
            assert torch.allclose(wa[name], wb[name], atol=ATOL, rtol=RTOL), name
            worst = max(worst, float((wa[name] - wb[name]).abs().max()))
    # the adapters are the same on both ranks, and training moved them
    w0 = load_file(str(folder / "witness" / "weights-rank0.safetensors"))
    w1 = load_file(str(folder / "witness" / "weights-rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(w0[k].abs().sum() > 0 for k in w0 if ".lora_B.student." in k)
    assert any(w0[k].abs().sum() > 0 for k in w0 if ".lora_B.fake_score." in k)
    # the checkpoints hold the same tensors as DDP's (whole, not shards)
    for step in (2, 4):
        fa = _tensor_files(folder / "out" / f"checkpoint-{step}")
        fb = _tensor_files(ddp / "out" / f"checkpoint-{step}")
        assert fa.keys() == fb.keys()
        for name in fa:
            assert fa[name].keys() == fb[name].keys(), name
            for key in fa[name]:
                if name.startswith("rng-"):
                    continue
                assert torch.allclose(fa[name][key].double(), fb[name][key].double(), atol=ATOL, rtol=RTOL), (name, key)
    print(f"FSDP2 vs DDP, largest difference of a loss, metric or adapter weight: {worst:.3g}")
    # the export: one LoRA, written once
    assert (folder / "out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_fsdp2_equals_ddp_with_dmd2s_gan_term(tmp_path, tiny_wan, tiny_dataset):
    # the GAN classifier head lives outside the sharded network and the DDP wrapper alike (the method averages its
    # gradient itself): under FSDP2 it trains as under DDP
    method = json.loads((REPO / "config_examples/tiny-wan-dmd/config.json").read_text())["distillation_config"]
    method = {**method, "gan_loss_weight": 0.5}
    for name, extra in (("fsdp", {"fsdp_enable": True}), ("ddp", {})):
        config = _config(tmp_path, tiny_wan, tiny_dataset, name, distillation_config=method, **{**COMMON, **extra})
        _launch(config, tmp_path / name / "witness")
    for rank in (0, 1):
        a = load_file(str(tmp_path / "fsdp" / "witness" / f"weights-rank{rank}.safetensors"))
        b = load_file(str(tmp_path / "ddp" / "witness" / f"weights-rank{rank}.safetensors"))
        assert a.keys() == b.keys() and any(k.startswith("gan_head") for k in a)
        for name in a:
            assert torch.allclose(a[name], b[name], atol=ATOL, rtol=RTOL), name
        ma = _record(tmp_path / "fsdp" / "witness", rank)["metrics"]
        mb = _record(tmp_path / "ddp" / "witness", rank)["metrics"]
        assert [m["gan_classifier_loss"] for m in ma] == pytest.approx([m["gan_classifier_loss"] for m in mb],
                                                                         abs=ATOL, rel=RTOL)


def _resume_copy(root: Path, folder: Path, name: str, tiny_wan: Path, tiny_dataset: Path, fsdp: bool = True) -> Path:
    """``folder``'s output with only checkpoint-2 left, in ``root/name``, and a config resuming from it."""
    shutil.copytree(folder / "out", root / name / "out", ignore=shutil.ignore_patterns("checkpoint-4"))
    return _config(root, tiny_wan, tiny_dataset, name, fsdp_enable=fsdp, **COMMON)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_a_checkpoint_resumes_on_two_processes_as_no_interruption(kind, request, tiny_wan, tiny_dataset):
    # DDP too: a 2-process resume used to give process 1 its last batch again (the batch count process 0 saved was
    # one short of the round both processes had taken)
    root, folder, _ = request.getfixturevalue(f"{kind.removesuffix('2')}_run")
    config = _resume_copy(root, folder, f"resumed-2-{kind}", tiny_wan, tiny_dataset, fsdp=kind == "fsdp2")
    resumed = root / f"resumed-2-{kind}"
    logs = _launch(config, resumed / "witness")
    assert "at step 2" in logs
    a, b = _tensor_files(folder / "out" / "checkpoint-4"), _tensor_files(resumed / "out" / "checkpoint-4")
    assert a.keys() == b.keys() and "dmd/fake_score_optimizer.safetensors" in a and "optimizer.safetensors" in a
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    for name in ("trainer_state.json", "dmd/state.json"):
        assert (folder / "out" / "checkpoint-4" / name).read_text() == (resumed / "out" / "checkpoint-4" / name
                                                                        ).read_text()


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_one_process(fsdp_run, tiny_wan, tiny_dataset, capsys):
    from tests.multiprocess.fsdp_job import main

    root, folder, _ = fsdp_run
    config = _resume_copy(root, folder, "resumed-1", tiny_wan, tiny_dataset)
    resumed = root / "resumed-1"
    threads = torch.get_num_threads()
    try:
        main(config, resumed / "witness")
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr()
    text = text.out + text.err
    assert "fsdp_enable: one process, nothing to shard" in text
    assert "at step 2" in text
    # it started from exactly the 2-process checkpoint's adapters ...
    start = load_file(str(resumed / "witness" / "start-rank0.safetensors"))
    ckpt = folder / "out" / "checkpoint-2"
    saved = {**load_file(str(ckpt / "student.safetensors")), **load_file(str(ckpt / "dmd" / "fake_score.safetensors"))}
    assert set(start) == set(saved)
    for name in start:
        assert torch.equal(start[name], saved[name]), name
    # ... and trained on to step 4, whose checkpoint carries the optimizers' step counts on from the 2-process run's
    assert json.loads((resumed / "out" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert json.loads((resumed / "out" / "checkpoint-4" / "dmd" / "state.json").read_text())["critic_updates"] == 4
    record = _record(resumed / "witness", 0)
    assert [m["step"] for m in record["metrics"]] == [2, 3]
    assert all(l["loss"] is None or torch.isfinite(torch.tensor(l["loss"])) for l in record["losses"])


def _raw(**overrides) -> dict:
    raw = json.loads((REPO / "config_examples/tiny-wan-dmd/config.json").read_text())
    raw.update(overrides)
    return raw


def test_fsdp_over_an_int8_quanto_base_is_refused_in_one_line():
    pm = get_plugin_manager()
    with pytest.raises(ConfigError) as info:
        validate_config(_raw(fsdp_enable=True, fsdp_version=2, base_model_precision="int8-quanto"), pm,
                        check_paths=False)
    lines = [p for p in info.value.problems if "fsdp" in p]
    assert len(lines) == 1 and "int8-quanto" in lines[0] and "DTensor" in lines[0], info.value.problems
    # the same config with a bf16 base validates; fsdp_version 1 does not
    validate_config(_raw(fsdp_enable=True, fsdp_version=2, base_model_precision="no_change"), pm, check_paths=False)
    with pytest.raises(ConfigError, match="fsdp_version"):
        validate_config(_raw(fsdp_enable=True, fsdp_version=1, base_model_precision="no_change"), pm,
                        check_paths=False)


def test_fsdp_refuses_a_full_student():
    pm = get_plugin_manager()
    with pytest.raises(ConfigError, match="needs model_type lora"):
        validate_config(_raw(fsdp_enable=True, base_model_precision="no_change", model_type="full"), pm,
                        check_paths=False)
