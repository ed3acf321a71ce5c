"""The check ``simpletuner train`` runs before it launches anything (``hosts/simpletuner/preflight.py``), against a
stand-in of SimpleTuner's ``simpletuner.cli.train`` that behaves as 4.10.1's does: ``run_training`` resolves the
config, hands the launch environment to ``subprocess.Popen`` and turns any ``Exception`` into a printed message and
exit status 1. Project environment only; the real thing: ``test_quickstart.py``."""

from __future__ import annotations

import json
import sys
import types

import pytest

from simpletuner_dmd.hosts.simpletuner import preflight


@pytest.fixture()
def cli(monkeypatch, tmp_path):
    """A stand-in ``simpletuner.cli.train`` module, wrapped by the plugin, and the ``Popen`` calls it made."""
    launched: list = []

    class FakeProcess:
        def wait(self):
            return 0

    fake_subprocess = types.SimpleNamespace(Popen=lambda cmd, env=None: launched.append((cmd, env)) or FakeProcess())
    module = types.ModuleType("simpletuner.cli.train")
    module.subprocess = fake_subprocess

    def run_training(example=None, env=None, extra_args=None):
        training_env = {"CONFIG_BACKEND": "json", "CONFIG_PATH": str(tmp_path / "config")}
        try:
            return module.subprocess.Popen(["accelerate", "launch", "train.py"], env=training_env).wait()
        except Exception as exc:  # as SimpleTuner's run_training does
            print(f"Error running training: {exc}")
            return 1

    module.run_training = run_training
    for name in ("simpletuner", "simpletuner.cli"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "simpletuner.cli.train", module)
    monkeypatch.setattr(sys.modules["simpletuner.cli"], "train", module, raising=False)
    # SimpleTuner's own argument checks need SimpleTuner; they are exercised by test_quickstart.py
    monkeypatch.setattr(preflight, "simpletuner_argument_problems", lambda config, served: [])
    preflight.wrap_cli_launch()
    return module, launched, tmp_path / "config.json"


def _config(**distillation) -> dict:
    return {"model_family": "wan", "model_type": "lora", "distillation_method": "dmd",
            "distillation_config": {"dmd_denoising_steps": "1000,757,522", **distillation}}


def test_a_mistake_launches_nothing_and_ends_with_the_error_lines(cli, capsys):
    module, launched, path = cli
    path.write_text(json.dumps(_config(fake_score_lrr=1e-5)))
    assert module.run_training() == 2
    assert launched == []
    err = capsys.readouterr().err.strip().splitlines()  # torch's import warnings may come first
    assert err[-1:] == ["error: distillation_config.fake_score_lrr: unknown key (did you mean 'fake_score_lr'?)"]
    assert sum(line.startswith("error: ") for line in err) == 1


def test_a_good_config_is_launched_with_simpletuners_environment(cli):
    module, launched, path = cli
    path.write_text(json.dumps(_config()))
    assert module.run_training() == 0
    assert len(launched) == 1 and launched[0][1]["CONFIG_PATH"].endswith("config")


def test_a_config_that_is_not_the_plugins_is_left_to_simpletuner(cli):
    module, launched, path = cli
    path.write_text(json.dumps({"model_family": "flux", "distillation_method": "perflow"}))
    assert module.run_training() == 0 and len(launched) == 1


def test_a_bug_in_the_check_keeps_its_traceback(cli, monkeypatch):
    """SimpleTuner's ``except Exception`` would print only the message; the wrapper re-raises the original."""
    module, launched, path = cli
    path.write_text(json.dumps(_config()))

    def broken(env):
        raise KeyError("a bug in the check")

    monkeypatch.setattr(preflight, "launch_problems", broken)
    with pytest.raises(KeyError, match="a bug in the check"):
        module.run_training()
    assert launched == []
