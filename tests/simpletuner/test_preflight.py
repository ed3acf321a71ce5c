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


def _fsdp_line(method: str) -> str:
    return (f"fsdp_enable: SimpleTuner's FSDP is not served with distillation_method {method} (simpletuner-dmd): its "
            "prepare replaces the network's parameters after the method built its own optimizer, which would then "
            "train nothing; leave fsdp_enable off (several processes train with DDP)")


def _cp_line(method: str, size: int) -> str:
    return (f"context_parallel_size: {size} is not served with distillation_method {method} (simpletuner-dmd): the "
            "method's own draws and losses are per process, not shared by a context-parallel group; use 1")


@pytest.mark.parametrize("setting, line", [
    ({"fsdp_enable": True, "fsdp_version": 2}, _fsdp_line("dmd")),
    ({"--fsdp_enable": "true", "--fsdp_version": 1}, _fsdp_line("dmd")),
    ({"context_parallel_size": "2"}, _cp_line("dmd", 2)),
])
def test_simpletuners_fsdp_and_context_parallelism_are_refused_before_the_launch(cli, capsys, setting, line):
    """SimpleTuner's FSDP would leave DMD's fake score training nothing (its optimizer keeps the tensors FSDP's prepare
    replaced), and context parallelism would split the network over processes whose draws differ
    (``docs/simpletuner-multi-gpu.md``): one line each, nothing launched."""
    module, launched, path = cli
    path.write_text(json.dumps({**_config(), **setting}))
    assert module.run_training() == 2
    assert launched == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1:] == [f"error: {line}"]


@pytest.mark.parametrize("setting", [{"fsdp_enable": False, "fsdp_version": 2}, {"context_parallel_size": 1},
                                     {"context_parallel_size": None}, {"--fsdp_enable": "false"}])
def test_fsdp_off_and_no_context_parallelism_launch(cli, setting):
    module, launched, path = cli
    path.write_text(json.dumps({**_config(), **setting}))
    assert module.run_training() == 0 and len(launched) == 1


def test_the_parallelism_check_speaks_for_every_plugin_method():
    assert preflight.parallelism_problems({"fsdp_enable": True, "context_parallel_size": 4}, "lcm") == [
        _fsdp_line("lcm"), _cp_line("lcm", 4)]


def test_the_training_process_refuses_them_too():
    """Any other way of starting SimpleTuner's trainer: checked right after its argument parsing (``patch.py``), where
    the values are SimpleTuner's parsed ones."""
    from simpletuner_dmd.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        preflight.check_parsed_config({**_config(), "fsdp_enable": True, "context_parallel_size": 2}, ["dmd"])
    assert str(refused.value).splitlines() == [_fsdp_line("dmd"), _cp_line("dmd", 2)]
    preflight.check_parsed_config({**_config(), "fsdp_enable": False, "context_parallel_size": None}, ["dmd"])


def test_fsdp_without_a_plugin_method_is_left_to_simpletuner(cli):
    module, launched, path = cli
    path.write_text(json.dumps({"model_family": "wan", "model_type": "lora", "fsdp_enable": True,
                                "context_parallel_size": 2}))
    assert module.run_training() == 0 and len(launched) == 1
