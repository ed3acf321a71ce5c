"""Swapping the method with one key: ``config_examples/tiny-wan-methods/config.json`` holds a keyed
``distillation_config`` for dmd, lcm, dcm and the third-party example method; each runs end to end through the
reference host with nothing changed but ``distillation_method``. A flat ``distillation_config`` of DMD keys (the
quickstart's) swaps too: the other method ignores them with one warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.example_packages import installed_example

from simpletuner_dmd import get_plugin_manager, registered_methods
from simpletuner_dmd.hosts.reference.trainer import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config_examples/tiny-wan-methods/config.json"
FLAT_CONFIG = REPO / "config_examples/tiny-wan-dmd/config.json"
QUICKSTART = REPO / "config_examples/wan-dmd-quickstart/config.json"
EXAMPLE = REPO / "examples" / "method_plugin"


@pytest.fixture(scope="module")
def example_method_installed(tmp_path_factory):
    """The example package as pip would install it (``pip install -e examples/method_plugin``): if it is not
    installed, a distribution made from its own ``pyproject.toml`` (name, version, entry points) on a temporary
    ``sys.path`` entry — the metadata ``importlib.metadata`` reads after a pip install."""
    with installed_example(EXAMPLE, tmp_path_factory.mktemp("site"), "guidance_distill") as project:
        yield project


@pytest.fixture(scope="module")
def backends(tmp_path_factory, tiny_dataset):
    """The example's data backends on a copy of the tiny dataset, with one latent cache for the whole module."""
    root = tmp_path_factory.mktemp("methods-data")
    data = root / "data"
    shutil.copytree(tiny_dataset, data)
    raw = json.loads(CONFIG.read_text())
    config = json.loads((REPO / raw["data_backend_config"]).read_text())
    for b in config:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(data)
        b["cache_dir"] = str(root / "cache" / b["id"])
    (root / "backends.json").write_text(json.dumps(config))
    return root / "backends.json"


@pytest.fixture()
def job(tmp_path, tiny_wan, backends):
    """The example config with its paths in tmp_path, 2 steps and a small validation."""
    raw = json.loads(CONFIG.read_text())
    raw.update(pretrained_model_name_or_path=str(tiny_wan), pretrained_t5_model_name_or_path=str(tiny_wan),
               data_backend_config=str(backends), output_dir=str(tmp_path / "out"),
               report_to="none", validation_num_video_frames=1, validation_resolution="32x32",
               max_train_steps=2, checkpoint_step_interval=0, use_ema=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def test_the_example_method_is_found_through_its_entry_point(example_method_installed):
    methods = registered_methods(get_plugin_manager())
    entry = methods["guidance_distill"]
    assert entry.distribution == example_method_installed["name"] and entry.plugin == "guidance_distill"
    assert {"dmd", "lcm", "dcm"} <= set(methods)
    assert {methods[m].distribution for m in ("dmd", "lcm", "dcm")} == {"simpletuner-dmd"}


METHOD_FILES = {
    "dmd": ["dmd/fake_score.safetensors", "dmd/state.json"],
    "lcm": ["lcm/state.json"],
    "dcm": ["dcm/state.json", "dcm/detail_expert.safetensors", "dcm/discriminator.safetensors",
            "dcm/discriminator_optimizer.safetensors", "dcm/detail_expert/pytorch_lora_weights.safetensors"],
    "guidance_distill": [],
}
LOSS_KEY = {"dmd": "dmd_loss", "lcm": "lcm_loss", "dcm": "dcm_timestep", "guidance_distill": "guidance_distill_loss"}


@pytest.mark.parametrize("method", ["dmd", "lcm", "dcm", "guidance_distill"])
def test_switching_only_distillation_method(job, method, example_method_installed, monkeypatch):
    logged: list[dict] = []
    from accelerate import Accelerator

    real_log = Accelerator.log
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append(dict(values))
                        or real_log(self, values, step=step, **kw))
    out = train(job, overrides={"distillation_method": method})
    ckpt = out / "checkpoint-2"
    assert (ckpt / "student.safetensors").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    for name in METHOD_FILES[method]:
        assert (ckpt / name).is_file(), name
    assert list((out / "validation" / "step-2" / "validation" / "student").glob("*.png"))
    # the validations' drift statistics (step 0 and step 2) are logged apart from the two training steps' metrics
    drift = [entry for entry in logged if all(k.startswith("drift/") for k in entry)]
    steps = [entry for entry in logged if entry not in drift]
    assert len(drift) == 2 and all("drift/student/brightness" in entry for entry in drift), drift
    assert len(steps) == 2 and any(LOSS_KEY[method] in entry for entry in steps), steps
    if method != "guidance_distill":
        assert any(k.startswith("passes/") for k in steps[-1])


def test_dcm_resumes_its_detail_expert_and_discriminator_and_another_method_cannot(job):
    quick = {"distillation_method": "dcm", "validation_disable": True}
    out = train(job, overrides={**quick, "max_train_steps": 1})
    state = json.loads((out / "checkpoint-1" / "dcm" / "state.json").read_text())
    train(job, overrides={**quick, "max_train_steps": 2, "resume_from_checkpoint": "latest"})
    resumed = json.loads((out / "checkpoint-2" / "dcm" / "state.json").read_text())
    assert resumed["mode"] == "fine"
    total = lambda s: s["semantic_batches"] + s["detail_updates"]  # noqa: E731 — one of the two per step
    assert total(state) == 1 and total(resumed) == 2
    # the same checkpoint, resumed by another method: the missing file is named
    from simpletuner_dmd.errors import UserError

    with pytest.raises(UserError, match="lcm/state.json"):
        train(job, overrides={**quick, "distillation_method": "lcm", "max_train_steps": 3,
                              "resume_from_checkpoint": "latest"})


@pytest.fixture()
def flat_job(tmp_path, tiny_wan, backends):
    """The tiny DMD example (a flat ``distillation_config``) holding the quickstart's 21 flat DMD keys, its paths in
    tmp_path, 2 steps and a small validation."""
    raw = json.loads(FLAT_CONFIG.read_text())
    raw.update(distillation_config=json.loads(QUICKSTART.read_text())["distillation_config"],
               pretrained_model_name_or_path=str(tiny_wan), pretrained_t5_model_name_or_path=str(tiny_wan),
               data_backend_config=str(backends), output_dir=str(tmp_path / "out"), report_to="none",
               validation_num_video_frames=1, validation_resolution="32x32", max_train_steps=2,
               checkpoint_step_interval=0, use_ema=False, disable_benchmark=True)
    assert raw["distillation_method"] == "dmd"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("spelling", ["lcm", "DCM"])  # (a method's name matches without regard to case)
def test_a_flat_dmd_config_runs_another_method_with_only_distillation_method_changed(flat_job, spelling, capsys):
    method = spelling.lower()
    out = train(flat_job, overrides={"distillation_method": spelling})
    for name in ("student.safetensors", f"{method}/state.json"):  # (dcm's default mode, semantic, has no expert)
        assert (out / "checkpoint-2" / name).is_file(), name
    assert not (out / "checkpoint-2" / "dmd").exists()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "validation" / "step-2" / "validation" / "student").glob("*.png"))
    printed = capsys.readouterr().out
    warned = [line for line in printed.splitlines() if "not apply to" in line]
    assert warned == [f"[simpletuner-dmd] warning: distillation_config: 21 keys of method dmd (dmd_denoising_steps, "
                      f"generator_update_interval, real_score_guidance_scale, …) do not apply to {method} and are "
                      f"ignored"]
    assert f"method: {method};" in printed
