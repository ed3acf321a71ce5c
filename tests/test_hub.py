"""`HubPusher` (push_to_hub, push_checkpoints_to_hub, hub_model_id) through the real ``huggingface_hub`` against
`tests.fake_hub`, a local stand-in for the hub's HTTP API: what arrives, with which token, in the background for
checkpoints, and what a failure does."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.hosts.reference.hub import HubPusher
from tests.fake_hub import start_fake_hub

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_FakeTokenForTests0123456789abcdef"


@pytest.fixture()
def hub(monkeypatch):
    import huggingface_hub.constants

    # else the first request's headers fetch huggingface_hub.constants.ENDPOINT's /api/agent-harnesses (the real
    # hub, whatever HfApi(endpoint=...) says); the subprocess test below, with HF_ENDPOINT, gets it from the fake
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    server = start_fake_hub()
    yield server
    server.stop()
    assert server.unexpected == []


@pytest.fixture()
def logs():
    return []


@pytest.fixture()
def pusher(hub, logs):
    return HubPusher("me/model", token=TOKEN, endpoint=hub.endpoint, log=logs.append)


def make_output(out: Path) -> dict[str, bytes]:
    """An output folder as the export leaves it, with what must not be pushed; returns what must be."""
    save_file({"lora_A": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(out / "pytorch_lora_weights.safetensors"))
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "FewStepFlowScheduler"}))
    (out / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n# student\n")
    (out / "validation" / "step-1").mkdir(parents=True)
    (out / "validation" / "step-1" / "prompt-0.gif").write_bytes(b"GIF89a" + bytes(range(40)))
    expected = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # never pushed by push_final
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "checkpoint.json").write_text("{}")
    (out / ".checkpoint-2.tmp").mkdir()
    (out / ".checkpoint-2.tmp" / "state.safetensors").write_bytes(b"half")
    (out / ".README.md.0123abcd.tmp").write_text("half-written")
    (out / "wandb").mkdir()
    (out / "wandb" / "run.log").write_text("log")
    (out / "scheduler" / ".hidden").write_text("x")
    return expected


def make_checkpoint(out: Path, step: int) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2,), float(step))}, str(folder / "student.safetensors"))
    (folder / "checkpoint.json").write_text(json.dumps({"step": step}))
    return folder


def no_token_anywhere(logs, capsys, caplog) -> None:
    captured = capsys.readouterr()
    for text in ["\n".join(logs), captured.out, captured.err, caplog.text]:
        assert TOKEN not in text


def warnings_in(logs) -> list[str]:
    return [line for line in logs if line.startswith("warning:")]


def wait_until(condition, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------- push_to_hub


def test_the_final_push_uploads_the_output_and_no_checkpoint(hub, pusher, logs, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    expected = make_output(tmp_path)
    url = pusher.push_final(tmp_path, commit_message="DMD student")
    assert [c.message for c in hub.commits] == ["DMD student"]
    commit = hub.commits[0]
    assert commit.repo_id == "me/model" and commit.revision == "main" and url.endswith(commit.repo_id + "/commit/"
                                                                                         + hub.repos["me/model"]["sha"])
    assert commit.files == expected  # exactly these paths, these bytes
    assert commit.authorization == f"Bearer {TOKEN}"
    assert [(r.method, r.path) for r in hub.requests] == [
        ("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"), ("POST", "/api/models/me/model/preupload/main"),
        ("POST", "/api/models/me/model/commit/main")]
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    assert hub.repos["me/model"]["visibility"] is None  # private=False: the namespace's default
    assert logs and "me/model" in logs[-1]
    no_token_anywhere(logs, capsys, caplog)


def test_a_name_alone_goes_to_the_token_owner_and_private_is_honoured(hub, logs, tmp_path):
    (tmp_path / "README.md").write_text("# card\n")
    pusher = HubPusher("model", token=TOKEN, endpoint=hub.endpoint, private=True, log=logs.append)
    pusher.push_final(tmp_path, commit_message="final")
    assert pusher.repo_id == "fake-user/model" and hub.commits[0].repo_id == "fake-user/model"
    assert hub.repos["fake-user/model"]["visibility"] == "private"
    # a second push to an existing repo: create answers 409 (exist_ok), unchanged files are left out
    (tmp_path / "extra.txt").write_text("new")
    again = HubPusher("fake-user/model", token=TOKEN, endpoint=hub.endpoint, log=logs.append)
    again.push_final(tmp_path, commit_message="again")
    assert [r.status for r in hub.requests if r.path == "/api/repos/create"] == [200, 409]
    assert hub.commits[1].files == {"extra.txt": b"new"}


def test_a_failing_hub_is_one_line_user_error(hub, pusher, logs, tmp_path, capsys, caplog):
    make_output(tmp_path)
    hub.fail("any", 500, times=-1)
    with pytest.raises(UserError) as caught:
        pusher.push_final(tmp_path, commit_message="final")
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(rf"push_to_hub: upload to me/model failed: .*500.*; the output is saved locally in "
                        rf"{re.escape(str(tmp_path))}", message), message
    assert caught.value.__cause__ is None and TOKEN not in message
    assert hub.commits == []
    no_token_anywhere(logs, capsys, caplog)


def test_an_unreachable_hub_is_one_line_user_error(hub, logs, tmp_path):
    (tmp_path / "README.md").write_text("# card\n")
    pusher = HubPusher("me/model", token=TOKEN, endpoint=hub.endpoint, log=logs.append)
    hub.stop()  # connection refused
    with pytest.raises(UserError, match=r"^push_to_hub: upload to me/model failed: ConnectError: .*; the output is "
                                        r"saved locally in ") as caught:
        pusher.push_final(tmp_path, commit_message="final")
    assert "\n" not in str(caught.value) and TOKEN not in str(caught.value)


def test_a_bad_repo_id_or_no_token_fails_before_anything_is_sent(hub, monkeypatch, tmp_path):
    with pytest.raises(UserError, match="^hub_model_id: 'a/b/c' is not a hub repo id"):
        HubPusher("a/b/c", token=TOKEN, endpoint=hub.endpoint)
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UserError, match="^push_to_hub: no Hugging Face token"):
        HubPusher("me/model", endpoint=hub.endpoint)
    assert hub.requests == []


def test_hf_endpoint_is_read_when_huggingface_hub_is_imported(hub, tmp_path, monkeypatch):
    """In-process, setting HF_ENDPOINT comes too late (hence ``endpoint=``); set before the import (a new process),
    it selects the hub, and HF_TOKEN is the token when none is given."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert HfApi().endpoint == constants.ENDPOINT != hub.endpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    script = textwrap.dedent(f"""
        from simpletuner_dmd.hosts.reference.hub import HubPusher
        HubPusher("me/model").push_final({str(tmp_path / "out")!r}, commit_message="from HF_ENDPOINT")
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("GET", "/api/agent-harnesses") in [(r.method, r.path) for r in hub.requests]
    assert [(c.message, c.files, c.authorization) for c in hub.commits] == [
        ("from HF_ENDPOINT", {"pytorch_lora_weights.safetensors": b"weights"}, f"Bearer {TOKEN}")]
    assert TOKEN not in done.stdout + done.stderr


# --------------------------------------------------------------------------- push_checkpoints_to_hub


def test_a_checkpoint_is_pushed_in_the_background(hub, pusher, logs, tmp_path, capsys, caplog):
    folder = make_checkpoint(tmp_path, 5)
    (folder / ".stale.tmp").write_text("x")
    hub.delay("commit", 1.0)
    start = time.monotonic()
    pusher.push_checkpoint(folder, 5)
    assert time.monotonic() - start < 0.3  # the repo creation and the upload happen in the background
    assert hub.commits == []
    assert pusher.close() == []
    assert time.monotonic() - start >= 0.9
    assert [(c.message, c.files, c.authorization) for c in hub.commits] == [
        ("checkpoint-5", {"checkpoint-5/student.safetensors": (folder / "student.safetensors").read_bytes(),
                          "checkpoint-5/checkpoint.json": b'{"step": 5}'}, f"Bearer {TOKEN}")]
    assert warnings_in(logs) == []
    no_token_anywhere(logs, capsys, caplog)


def test_only_the_latest_waiting_checkpoint_is_kept(hub, pusher, logs, tmp_path):
    hub.delay("commit", 0.5)
    folders = {step: make_checkpoint(tmp_path, step) for step in (1, 2, 3)}
    pusher.push_checkpoint(folders[1], 1)
    wait_until(lambda: any(r.path.endswith("/commit/main") for r in hub.requests))  # checkpoint-1 is under way
    start = time.monotonic()
    pusher.push_checkpoint(folders[2], 2)
    pusher.push_checkpoint(folders[3], 3)
    assert time.monotonic() - start < 0.3
    assert pusher.close() == [2]
    assert [c.message for c in hub.commits] == ["checkpoint-1", "checkpoint-3"]
    assert any("checkpoint-2 not uploaded" in line for line in logs)


def test_a_single_500_is_retried_by_huggingface_hub_itself(hub, pusher, logs, tmp_path):
    hub.fail("commit", 500, times=1)
    pusher.push_checkpoint(make_checkpoint(tmp_path, 1), 1)
    assert pusher.close() == []
    assert [r.status for r in hub.requests if r.path.endswith("/commit/main")] == [500, 200]
    assert warnings_in(logs) == []


def test_a_failed_checkpoint_is_retried_with_the_next_one(hub, pusher, logs, tmp_path, capsys, caplog):
    hub.fail("commit", 500, times=6)  # the first upload's commit and huggingface_hub's five retries
    pusher.push_checkpoint(make_checkpoint(tmp_path, 1), 1)
    wait_until(lambda: warnings_in(logs))
    [warning] = warnings_in(logs)
    assert re.fullmatch(r"warning: push_checkpoints_to_hub: upload of checkpoint-1 to me/model failed: .*500.*; "
                        r"it is retried with the next checkpoint", warning), warning
    assert hub.commits == []
    start = time.monotonic()
    pusher.push_checkpoint(make_checkpoint(tmp_path, 2), 2)
    assert time.monotonic() - start < 0.3
    assert pusher.close() == []
    assert [c.message for c in hub.commits] == ["checkpoint-1", "checkpoint-2"]
    assert set(hub.commits[0].files) == {"checkpoint-1/student.safetensors", "checkpoint-1/checkpoint.json"}
    assert len(warnings_in(logs)) == 1
    no_token_anywhere(logs, capsys, caplog)


def test_a_failed_checkpoint_is_retried_at_close(hub, pusher, logs, tmp_path):
    hub.fail("preupload", 500, times=6)
    pusher.push_checkpoint(make_checkpoint(tmp_path, 7), 7)
    wait_until(lambda: warnings_in(logs))
    assert pusher.close() == []
    assert [c.message for c in hub.commits] == ["checkpoint-7"]
    assert len(warnings_in(logs)) == 1


def test_a_checkpoint_that_keeps_failing_is_reported_by_close(hub, pusher, logs, tmp_path):
    hub.fail("commit", 403, times=-1)  # not retried by huggingface_hub
    pusher.push_checkpoint(make_checkpoint(tmp_path, 3), 3)
    assert pusher.close() == [3]
    assert len(warnings_in(logs)) == 2  # the upload, then close's one more try
    assert all("403" in line and TOKEN not in line for line in warnings_in(logs))
    pusher.push_checkpoint(make_checkpoint(tmp_path, 4), 4)  # after close: refused, never raises
    assert hub.commits == []


def test_a_pruned_checkpoint_is_dropped(hub, pusher, logs, tmp_path):
    hub.delay("commit", 0.5)
    pusher.push_checkpoint(make_checkpoint(tmp_path, 1), 1)
    wait_until(lambda: any(r.path.endswith("/commit/main") for r in hub.requests))
    doomed = make_checkpoint(tmp_path, 2)
    pusher.push_checkpoint(doomed, 2)
    for path in doomed.iterdir():
        path.unlink()
    doomed.rmdir()  # checkpoints_total_limit pruned it before its turn
    assert pusher.close() == [2]
    assert [c.message for c in hub.commits] == ["checkpoint-1"]
    assert any("checkpoint-2 not uploaded" in line and "gone" in line for line in warnings_in(logs))


def test_close_with_a_timeout_returns_what_is_still_running(hub, pusher, logs, tmp_path):
    hub.delay("commit", 2.0)
    pusher.push_checkpoint(make_checkpoint(tmp_path, 1), 1)
    start = time.monotonic()
    assert pusher.close(timeout=0.3) == [1]
    assert time.monotonic() - start < 1.5
    hub.wait_for_commits(1)  # the upload under way still ends (before the fake hub stops)


# --------------------------------------------------------------------------- through the reference host


def test_a_training_run_pushes_its_checkpoints_and_its_output(hub, job, monkeypatch, capsys):
    from simpletuner_dmd.hosts.reference.trainer import train

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = train(job(max_train_steps=2, checkpoint_step_interval=1, validation_step_interval=0, push_to_hub=True,
                    push_checkpoints_to_hub=True, hub_model_id="me/tiny-wan-dmd", disable_benchmark=True))
    commits = hub.wait_for_commits(3)
    assert all(c.repo_id == "me/tiny-wan-dmd" and c.authorization == f"Bearer {TOKEN}" for c in commits)
    checkpoints = sorted({p.split("/")[0] for c in commits[:-1] for p in c.files})
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    final = commits[-1].files
    for name in ("pytorch_lora_weights.safetensors", "wan_dmd_3step_lora_rank16.safetensors", "README.md",
                 "scheduler/scheduler_config.json", "ema/pytorch_lora_weights.safetensors",
                 "validation/step-2/validation/ema/sample.gif"):
        assert final[name] == (out / name).read_bytes(), name
    assert not any(p.startswith("checkpoint-") for p in final)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_a_failed_final_push_exits_non_zero_after_everything_is_saved(hub, job, monkeypatch, capsys):
    from simpletuner_dmd.cli import main

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail("commit", 500, times=6)
    config = job(max_train_steps=1, validation_disable=True, push_to_hub=True, hub_model_id="me/model")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "push_to_hub: upload to me/model failed" in line[0] and "saved locally" in line[0]
    out = json.loads(config.read_text())["output_dir"]
    assert (Path(out) / "pytorch_lora_weights.safetensors").is_file() and (Path(out) / "README.md").is_file()
