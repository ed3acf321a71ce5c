"""The tiny example configs run as shipped after the one documented command that makes what they name
(``work/tiny-wan``, ``work/tiny-dataset``): the command is read from the examples' own READMEs and the project README,
run in a fresh working directory beside a copy of ``config_examples/``, and each config trains there with nothing
changed but its step count (200 as shipped: about 2 minutes each on 2 CPU cores; 2 here)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from simpletuner_dmd.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ("tiny-wan-dmd", "tiny-wan-methods")


def documented_commands(text: str) -> list[str]:
    """Every ``simpletuner-dmd make-tiny … --dataset …`` command a document gives (in a code block or inline)."""
    return re.findall(r"simpletuner-dmd make-tiny [^`\n]*--dataset [^`\n]*[^`\s]", text)


def test_one_documented_command_makes_what_the_tiny_examples_name():
    found = {name: documented_commands((REPO / "config_examples" / name / "README.md").read_text())
             for name in EXAMPLES}
    found["README.md"] = documented_commands((REPO / "README.md").read_text())
    assert all(len(commands) == 1 for commands in found.values()), found
    assert len({commands[0] for commands in found.values()}) == 1, found
    named = set()
    for name in EXAMPLES:
        config = json.loads((REPO / "config_examples" / name / "config.json").read_text())
        backends = json.loads((REPO / config["data_backend_config"]).read_text())
        named |= {config["pretrained_model_name_or_path"], config["pretrained_t5_model_name_or_path"]}
        named |= {b["instance_data_dir"] for b in backends if "instance_data_dir" in b}
    args = shlex.split(found["README.md"][0])[1:]
    assert named == {args[2], args[args.index("--dataset") + 1]} == {"work/tiny-wan", "work/tiny-dataset"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh working directory holding a copy of config_examples/, after the documented command ran in it."""
    root = tmp_path_factory.mktemp("tiny-examples")
    for name in EXAMPLES:
        shutil.copytree(REPO / "config_examples" / name, root / "config_examples" / name)
    (command,) = documented_commands((REPO / "config_examples" / EXAMPLES[0] / "README.md").read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(shlex.split(command)[1:]) == 0
    return root


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_tiny_example_trains_as_shipped_after_that_command(workdir, name, monkeypatch, capsys):
    from simpletuner_dmd.hosts.reference.trainer import train

    from simpletuner_dmd.hosts.reference.run_config import load_config
    from simpletuner_dmd.plugins import get_plugin_manager

    monkeypatch.chdir(workdir)
    config = Path("config_examples") / name / "config.json"
    assert load_config(config, get_plugin_manager(), check_paths=True).method_name == "dmd"  # its paths are there
    out = train(config, overrides={"max_train_steps": 2})
    assert out == Path(json.loads(config.read_text())["output_dir"])
    for file in ("pytorch_lora_weights.safetensors", "wan_dmd_3step_lora_rank16.safetensors", "README.md",
                 "scheduler/scheduler_config.json", "checkpoint-2/student.safetensors", "ema/pytorch_lora_weights"
                 ".safetensors"):
        assert (workdir / out / file).is_file(), file
    assert list((workdir / out / "validation" / "step-2" / "validation" / "ema").glob("frame-*.png"))
    assert "done: 2 steps" in capsys.readouterr().out


def test_make_tiny_refuses_an_existing_dataset_folder_before_building_anything(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert main(["make-tiny", "wan", str(tmp_path / "model"), "--dataset", str(tmp_path / "data")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: make-tiny: {tmp_path / 'data'} exists; give a new folder"]
    assert not (tmp_path / "model").exists() and not list((tmp_path / "data").iterdir())
