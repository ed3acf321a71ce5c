from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.hosts.reference.checkpoint import (
    MARKER,
    begin_checkpoint,
    checkpoint_damage,
    checkpoint_step,
    commit_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    resolve_resume,
)
from simpletuner_dmd.hosts.reference.ema import EMA
from simpletuner_dmd.lr_schedules import SCHEDULES, build_lr_lambda
from simpletuner_dmd.state_io import load_state, save_state


def save(output_dir, step, total_limit=None, payload="x"):
    tmp = begin_checkpoint(output_dir, step)
    (tmp / "payload.txt").write_text(payload)
    return commit_checkpoint(tmp, output_dir, step, total_limit)


# --------------------------------------------------------------------------- checkpoint folders


def test_commit_publishes_a_marked_folder(tmp_path):
    tmp = begin_checkpoint(tmp_path, 10)
    assert tmp.name == ".checkpoint-10.tmp" and tmp.is_dir()
    assert latest_checkpoint(tmp_path) is None  # still being written: invisible
    save_state(tmp / "training", {"step": 10})
    final = commit_checkpoint(tmp, tmp_path, 10, None)
    assert final == tmp_path / "checkpoint-10" and not tmp.exists()
    marker = json.loads((final / MARKER).read_text())
    assert marker["step"] == 10 and marker["format_version"] == 1 and marker["time"] > 0
    assert load_state(final / "training") == {"step": 10}
    assert checkpoint_step(final) == 10
    assert list_checkpoints(tmp_path) == [(10, final)]


def test_begin_clears_a_crashed_attempt(tmp_path):
    tmp = begin_checkpoint(tmp_path, 5)
    (tmp / "half-written").write_text("junk")
    assert list(begin_checkpoint(tmp_path, 5).iterdir()) == []


def test_partial_checkpoints_are_never_latest(tmp_path):
    save(tmp_path, 100)
    begin_checkpoint(tmp_path, 300)  # crash while writing 300
    no_marker = tmp_path / "checkpoint-200"  # e.g. copied by hand, or an old tool
    no_marker.mkdir()
    garbled = tmp_path / "checkpoint-250"
    garbled.mkdir()
    (garbled / MARKER).write_text('{"step": 25')  # truncated
    wrong_step = tmp_path / "checkpoint-260"
    wrong_step.mkdir()
    (wrong_step / MARKER).write_text((tmp_path / "checkpoint-100" / MARKER).read_text())

    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"
    assert [step for step, _ in list_checkpoints(tmp_path)] == [100]
    assert not (tmp_path / ".checkpoint-300.tmp").exists()  # stale leftover cleaned up
    assert no_marker.exists()  # not ours to delete: only .tmp folders are removed


def test_steps_sort_numerically_and_recommit_replaces(tmp_path):
    for step in (9, 10, 100):
        save(tmp_path, step)
    save(tmp_path, 10, payload="second")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [9, 10, 100]
    assert (tmp_path / "checkpoint-10" / "payload.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("limit, kept", [(None, [1, 2, 3, 4]), (0, [1, 2, 3, 4]), (2, [3, 4]), (1, [4])])
def test_total_limit_keeps_the_newest(tmp_path, limit, kept):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, total_limit=limit)
    assert [step for step, _ in list_checkpoints(tmp_path)] == kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_total_limit_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (100, 200, 300):
        save(tmp_path, step)
    save(tmp_path, 150, total_limit=2)  # resumed from an early step and saved again
    assert [step for step, _ in list_checkpoints(tmp_path)] == [150, 300]


def test_total_limit_ignores_partial_folders(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()  # no marker: neither counted nor deleted
    save(tmp_path, 2, total_limit=1)
    save(tmp_path, 3, total_limit=1)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]
    assert (tmp_path / "checkpoint-1").is_dir()


# --------------------------------------------------------------------------- resume_from_checkpoint


@pytest.mark.parametrize("value", [None, False, "", "  ", "false", "None"])
def test_resolve_resume_off(tmp_path, value):
    save(tmp_path, 1)
    assert resolve_resume(tmp_path, value) is None


def test_resolve_resume_latest(tmp_path):
    assert resolve_resume(tmp_path / "not-yet-created", "latest") is None
    assert resolve_resume(tmp_path, "latest") is None
    save(tmp_path, 3)
    save(tmp_path, 7)
    begin_checkpoint(tmp_path, 9)
    assert resolve_resume(tmp_path, "latest") == (tmp_path / "checkpoint-7").resolve()
    assert not (tmp_path / ".checkpoint-9.tmp").exists()


def test_resolve_resume_by_name_or_path(tmp_path):
    first = save(tmp_path / "run1", 3)
    assert resolve_resume(tmp_path / "run1", "checkpoint-3") == first.resolve()
    assert resolve_resume(tmp_path / "run2", str(first)) == first.resolve()


def test_resolve_resume_errors_name_the_checkpoint(tmp_path):
    save(tmp_path, 3)
    with pytest.raises(UserError, match="checkpoint-4") as missing:
        resolve_resume(tmp_path, "checkpoint-4")
    assert "\n" not in str(missing.value)
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(UserError, match="checkpoint-5.*not a complete checkpoint") as partial:
        resolve_resume(tmp_path, "checkpoint-5")
    assert "\n" not in str(partial.value)
    with pytest.raises(UserError, match="resume_from_checkpoint"):
        resolve_resume(tmp_path, True)


# --------------------------------------------------------------------------- the manifest and damaged checkpoints


def save_state_like(output_dir, step):
    """A checkpoint shaped like the trainer's: state pairs, a method's subfolder, a plain JSON file."""
    tmp = begin_checkpoint(output_dir, step)
    save_state(tmp / "ema", {"shadow": torch.arange(4000, dtype=torch.float32), "step": step})
    save_state(tmp / "dmd" / "fake_score", {"w": torch.ones(3, 3) * step})
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return commit_checkpoint(tmp, output_dir, step, None)


def test_the_marker_lists_every_file_with_its_size_and_sha256(tmp_path):
    final = save_state_like(tmp_path, 4)
    files = json.loads((final / MARKER).read_text())["files"]
    on_disk = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file() and p.name != MARKER)
    assert sorted(files) == on_disk
    assert {"ema.safetensors", "ema.json", "dmd/fake_score.safetensors", "dmd/fake_score.json",
            "trainer_state.json"} == set(on_disk)
    for rel, entry in files.items():
        data = (final / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert checkpoint_damage(final) is None


def _truncate(folder):
    path = folder / "ema.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:100])
    return f"ema.safetensors: size 100, expected {size}"


def _delete(folder):
    (folder / "dmd" / "fake_score.safetensors").unlink()
    return "dmd/fake_score.safetensors: missing"


def _flip_a_byte(folder):  # same size, different content: only the checksum sees it
    path = folder / "ema.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return "ema.safetensors: sha256 differs"


def _garble_the_marker(folder):
    (folder / MARKER).write_text('{"format": "simpletuner-dmd-checkpoint", "files": {')
    return f"no valid {MARKER}"


def _point_the_manifest_outside(folder):  # a hostile manifest never makes the check read outside the folder
    marker = json.loads((folder / MARKER).read_text())
    marker["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    (folder / MARKER).write_text(json.dumps(marker))
    return "malformed entry '../../etc/passwd'"


DAMAGE = [_truncate, _delete, _flip_a_byte, _garble_the_marker, _point_the_manifest_outside]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_latest_falls_back_past_a_damaged_checkpoint_with_one_warning(tmp_path, damage):
    save_state_like(tmp_path, 2)
    save_state_like(tmp_path, 4)
    what = damage(tmp_path / "checkpoint-4")
    warnings: list[str] = []
    assert resolve_resume(tmp_path, "latest", warn=warnings.append) == (tmp_path / "checkpoint-2").resolve()
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("checkpoint-4 is damaged (") and what in warnings[0], warnings
    assert warnings[0].endswith("; resuming from checkpoint-2")
    assert (tmp_path / "checkpoint-4").is_dir()  # kept for the user to look at; the next save of step 4 replaces it


def test_latest_names_every_damaged_checkpoint_it_skips_in_one_line(tmp_path):
    for step in (1, 2, 3):
        save_state_like(tmp_path, step)
    first, second = _truncate(tmp_path / "checkpoint-3"), _delete(tmp_path / "checkpoint-2")
    warnings: list[str] = []
    assert resolve_resume(tmp_path, "latest", warn=warnings.append) == (tmp_path / "checkpoint-1").resolve()
    assert warnings == [f"checkpoint-3 is damaged ({first}); checkpoint-2 is damaged ({second}); "
                        "resuming from checkpoint-1"]


def test_latest_with_no_intact_checkpoint_is_one_user_error(tmp_path):
    save_state_like(tmp_path, 2)
    save_state_like(tmp_path, 4)
    what4, what2 = _truncate(tmp_path / "checkpoint-4"), _flip_a_byte(tmp_path / "checkpoint-2")
    with pytest.raises(UserError) as info:
        resolve_resume(tmp_path, "latest", warn=pytest.fail)
    message = str(info.value)
    assert "\n" not in message and message.startswith("resume_from_checkpoint: latest: no intact checkpoint")
    assert f"checkpoint-4 is damaged ({what4})" in message and "checkpoint-2 is damaged" in message
    assert what2 in message


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_checkpoint_named_explicitly_is_one_user_error_naming_the_file(tmp_path, damage):
    save_state_like(tmp_path, 2)
    save_state_like(tmp_path, 4)
    what = damage(tmp_path / "checkpoint-4")
    for value in ("checkpoint-4", str(tmp_path / "checkpoint-4")):
        with pytest.raises(UserError) as info:
            resolve_resume(tmp_path / "elsewhere", value) if value.startswith("/") else resolve_resume(tmp_path, value)
        assert "\n" not in str(info.value) and "checkpoint-4" in str(info.value) and what in str(info.value)
    assert resolve_resume(tmp_path, "checkpoint-2", warn=pytest.fail) == (tmp_path / "checkpoint-2").resolve()


def test_files_the_manifest_does_not_list_are_ignored(tmp_path):
    final = save_state_like(tmp_path, 2)
    (final / "optimizer.bin").write_bytes(b"planted")  # never read by a resume, so no reason to refuse
    assert resolve_resume(tmp_path, "latest", warn=pytest.fail) == final.resolve()


def test_a_checkpoint_from_before_manifests_is_resumed_with_a_warning(tmp_path):
    """Policy: a marker without "files" (written before manifests) cannot be checked; it is resumed as it is, with
    one warning, by "latest" and by name, and is not passed over for an older checkpoint."""
    save_state_like(tmp_path, 2)
    old = save_state_like(tmp_path, 4)
    marker = json.loads((old / MARKER).read_text())
    del marker["files"]
    (old / MARKER).write_text(json.dumps(marker))
    for value in ("latest", "checkpoint-4"):
        warnings: list[str] = []
        assert resolve_resume(tmp_path, value, warn=warnings.append) == old.resolve()
        assert warnings == ["checkpoint-4 has no file manifest (it was written by a version before manifests), so "
                            "it cannot be checked for damage; resuming from it as it is"]


# --------------------------------------------------------------------------- EMA


def lora_params():
    return {"a": torch.nn.Parameter(torch.zeros(2, 3)), "b": torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))}


def test_ema_updates_only_on_the_interval(tmp_path):
    params = lora_params()
    ema = EMA(params, decay=0.5, update_interval=2)
    with torch.no_grad():
        params["a"].fill_(1.0)
        params["b"].fill_(1.0)
    assert [ema.update(step) for step in (1, 2, 2, 3, 4)] == [False, True, False, False, True]
    assert ema.num_updates == 2
    assert torch.equal(ema.shadow["a"], torch.full((2, 3), 0.75))
    assert ema.shadow["b"].dtype == torch.float32  # averaged in fp32 even for bf16 weights

    save_state(tmp_path / "ema", ema.state_dict())
    restored = EMA(lora_params(), decay=0.5, update_interval=2)
    restored.load_state_dict(load_state(tmp_path / "ema"))
    assert restored.num_updates == 2 and restored.last_step == 4
    assert torch.equal(restored.shadow["a"], ema.shadow["a"])


def test_ema_load_rejects_a_different_lora_layout():
    ema = EMA(lora_params(), decay=0.9)
    state = ema.state_dict()
    state["shadow"]["a"] = torch.zeros(5)
    with pytest.raises(UserError, match="shape"):
        ema.load_state_dict(state)
    del state["shadow"]["a"]
    with pytest.raises(UserError, match="missing"):
        ema.load_state_dict(state)


def test_ema_swap_restores_live_weights_even_on_error():
    params = lora_params()
    ema = EMA(params, decay=0.0)  # decay 0: the average becomes the live weights at each update
    with torch.no_grad():
        params["a"].fill_(2.0)
    ema.update(1)
    with torch.no_grad():
        params["a"].fill_(5.0)

    with ema.swap_into(params):
        assert torch.equal(params["a"], torch.full((2, 3), 2.0))
    assert torch.equal(params["a"], torch.full((2, 3), 5.0))

    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap_into():
            assert torch.equal(params["a"], torch.full((2, 3), 2.0))
            raise RuntimeError("boom")
    assert torch.equal(params["a"], torch.full((2, 3), 5.0))
    assert params["a"].requires_grad


def test_ema_copy_to():
    params = lora_params()
    ema = EMA(params, decay=0.0)
    with torch.no_grad():
        params["b"].fill_(3.0)
    ema.update(1)
    copied = ema.copy_to()
    assert copied["b"].dtype == torch.bfloat16 and torch.equal(copied["b"], torch.full((4,), 3.0, dtype=torch.bfloat16))
    target = {"a": torch.ones(2, 3), "b": torch.zeros(4)}
    assert ema.copy_to(target) is target and torch.equal(target["b"], torch.full((4,), 3.0))
    with pytest.raises(ValueError):
        ema.copy_to({"a": torch.ones(2, 3)})


# --------------------------------------------------------------------------- lr schedules


def test_lr_lambdas_at_key_points():
    constant = build_lr_lambda("constant", warmup_steps=4, total_steps=100)
    assert [constant(s) for s in (0, 2, 4, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert build_lr_lambda("constant_with_warmup", warmup_steps=0, total_steps=10)(0) == 1.0

    cosine = build_lr_lambda("cosine", warmup_steps=10, total_steps=110)
    assert cosine(5) == 0.5 and cosine(10) == 1.0
    assert cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0.0, abs=1e-12)
    assert cosine(200) == cosine(110)  # stays at the floor instead of rising again

    floor = build_lr_lambda("cosine_with_min_lr", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert floor(10) == 1.0 and floor(60) == pytest.approx(0.55) and floor(110) == pytest.approx(0.1)
    assert floor(500) == pytest.approx(0.1)

    linear = build_lr_lambda("linear", warmup_steps=0, total_steps=10)
    assert [linear(s) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]


def test_lr_lambdas_are_stateless_functions():
    # LambdaLR saves nothing for plain functions, so a rebuilt scheduler resumes the same curve.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for name in SCHEDULES:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(name, warmup_steps=2, total_steps=8))
        assert scheduler.state_dict()["lr_lambdas"] == [None]
        values = [build_lr_lambda(name, warmup_steps=2, total_steps=8)(s) for s in range(12)]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ValueError, match="cosine_with_min_lr"):
        build_lr_lambda("polynomial", warmup_steps=0, total_steps=1)
