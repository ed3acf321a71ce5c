"""The command line: a user's mistake is `error:` lines and exit status 2, never a traceback or a half-written run.

Most tests call ``cli.main`` in-process (importing the stack costs seconds per process); two subprocess calls prove
that the installed console script and ``python -m simpletuner_dmd`` really exit with status 2.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from simpletuner_dmd.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config_examples" / "tiny-wan-dmd"


@pytest.fixture(scope="session")
def cli_tiny_wan(tmp_path_factory) -> Path:
    from simpletuner_dmd.families.wan_tiny import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("cli-tiny-model") / "tiny-wan")


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    # The trainer fills these with setdefault; set them here so nothing leaks into later tests.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def assert_user_error(rc: int, out: str, err: str, *fragments: str) -> list[str]:
    assert rc == 2, (rc, out, err)
    lines = error_lines(err)
    assert lines, err
    assert "Traceback" not in err and "Traceback" not in out
    for fragment in fragments:
        assert any(fragment in line for line in lines), (fragment, lines)
    return lines


def example_config() -> dict:
    return json.loads((EXAMPLE / "config.json").read_text())


def png_bytes(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return buf.getvalue()


def make_run(tmp_path: Path, model: Path, *, dataset: str = "good", overrides: dict | None = None,
             text: str | None = None) -> tuple[Path, Path]:
    """The example config with absolute paths into tmp_path; returns (config file, output_dir)."""
    data = tmp_path / "data"
    data.mkdir()
    if dataset == "good":
        (data / "a.png").write_bytes(png_bytes())
        (data / "a.txt").write_text("a red square\n")
    elif dataset == "corrupt":
        raw = png_bytes()
        (data / "broken.png").write_bytes(raw[: len(raw) // 2])
        (data / "broken.txt").write_text("a red square\n")
    backends = [
        {"id": "images", "type": "local", "dataset_type": "image", "instance_data_dir": str(data),
         "caption_strategy": "textfile", "cache_dir": str(tmp_path / "cache"), "resolution": 64,
         "resolution_type": "pixel_area"},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "text")},
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    out = tmp_path / "output"
    cfg = example_config()
    cfg.update(pretrained_model_name_or_path=str(model), pretrained_t5_model_name_or_path=str(model),
               data_backend_config=str(tmp_path / "multidatabackend.json"), output_dir=str(out))
    cfg.update(overrides or {})
    path = tmp_path / "config.json"
    path.write_text(text if text is not None else json.dumps(cfg, indent=2))
    return path, out


def assert_nothing_half_written(out: Path) -> None:
    if not out.exists():
        return
    leftovers = [p for p in out.rglob("*") if "checkpoint" in p.name or p.name.endswith(".tmp")]
    assert leftovers == []
    assert not (out / "pytorch_lora_weights.safetensors").exists()


# --------------------------------------------------------------------------- plugins


def test_plugins_lists_dmd_and_wan_with_their_distribution(capsys):
    rc, out, err = run_cli(capsys, "plugins")
    assert rc == 0, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ")}
    assert rows.get("dmd") == "simpletuner-dmd"
    assert rows.get("wan") == "simpletuner-dmd"
    assert out.index("methods:") < out.index("  dmd") < out.index("model families:") < out.index("  wan")
    assert rows.get("wan2.2") == rows.get("wan2.2-ti2v") == "simpletuner-dmd"


def test_make_tiny_builds_a_family_pipeline_and_refuses_unknown_names_and_existing_folders(capsys, tmp_path):
    from diffusers import WanPipeline

    rc, out, err = run_cli(capsys, "make-tiny", "wan2.2", str(tmp_path / "a14b"))
    assert rc == 0, err
    pipe = WanPipeline.from_pretrained(str(tmp_path / "a14b"))
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    rc, _, err = run_cli(capsys, "make-tiny", "wan2.2", str(tmp_path / "a14b"))
    assert rc == 2 and "exists" in err
    rc, _, err = run_cli(capsys, "make-tiny", "wan22", str(tmp_path / "b"))
    assert rc == 2 and "unknown family 'wan22'" in err and "wan2.2" in err and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- validate-config


def test_validate_config_on_the_example_is_ok_and_silent(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the example's paths are relative to the repository root
    rc, out, err = run_cli(capsys, "validate-config", "config_examples/tiny-wan-dmd/config.json", "--no-check-paths")
    assert rc == 0, err
    first, line = out.splitlines()  # no warnings: the embedded example uses only keys the host implements
    assert first == "every key of this config is in effect: none is ignored"
    assert line.startswith("ok: config_examples/tiny-wan-dmd/config.json (method: dmd, ")
    assert line.endswith("; family: wan)")


def test_validate_config_checks_paths(capsys, tmp_path, cli_tiny_wan):
    cfg = example_config()
    cfg.update(pretrained_model_name_or_path=str(cli_tiny_wan), pretrained_t5_model_name_or_path=str(cli_tiny_wan),
               data_backend_config=str(EXAMPLE / "multidatabackend.json"))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(cfg))
    rc, out, err = run_cli(capsys, "validate-config", good)
    assert rc == 0 and out.splitlines()[-1].startswith("ok: "), err

    cfg["pretrained_model_name_or_path"] = str(tmp_path / "missing-model")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    rc, out, err = run_cli(capsys, "validate-config", bad)
    assert_user_error(rc, out, err, "config.pretrained_model_name_or_path: model folder not found")
    rc, out, err = run_cli(capsys, "validate-config", bad, "--no-check-paths")
    assert rc == 0, err


def test_validate_config_reads_the_data_backend_file(capsys, tmp_path, cli_tiny_wan):
    """Every problem of the backend file is reported by validate-config (the trainer checks the same before it loads
    any model), all at once."""
    backends = json.loads((EXAMPLE / "multidatabackend.json").read_text())
    for backend in backends:
        if backend.get("dataset_type") != "text_embeds":
            backend["resolution_type"] = "pixel_volume"
            backend["crop_style"] = 3
    file = tmp_path / "backends.json"
    file.write_text(json.dumps(backends))
    cfg = example_config()
    cfg.update(pretrained_model_name_or_path=str(cli_tiny_wan), pretrained_t5_model_name_or_path=str(cli_tiny_wan),
               data_backend_config=str(file))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    rc, out, err = run_cli(capsys, "validate-config", config)
    assert rc == 2 and "resolution_type: must be one of 'pixel_area', 'pixel', got 'pixel_volume'" in err, err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) >= 2, err  # all at once


@pytest.mark.parametrize("overrides, keys", [
    ({"learning_rate": "fast"}, ["config.learning_rate"]),
    ({"distillation_config": {"generator_update_interval": 0, "fake_score_betas": [0.9]}, "model_family": "wann"},
     ["distillation_config.generator_update_interval", "distillation_config.fake_score_betas",
      "config.model_family"]),
    ({"distillation_method": "dmdd"}, ["config.distillation_method"]),
])
def test_validate_config_on_bad_configs(capsys, tmp_path, overrides, keys):
    cfg = {**example_config(), **overrides}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    rc, out, err = run_cli(capsys, "validate-config", path, "--no-check-paths")
    lines = assert_user_error(rc, out, err)
    assert sorted(line[len("error: "):].split(":", 1)[0] for line in lines) == sorted(keys)
    assert "ok:" not in out


def test_validate_config_on_a_missing_file(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "validate-config", tmp_path / "nope.json")
    assert_user_error(rc, out, err, "file not found")


# --------------------------------------------------------------------------- train: bad input stops cleanly


TRAIN_CASES = {
    "missing model folder": (dict(overrides={"pretrained_model_name_or_path": "MISSING"}),
                             ["config.pretrained_model_name_or_path", "model folder not found"]),
    "malformed JSON": (dict(text='{\n  "model_family": "wan",\n  "seed": 1,,\n}\n'), ["not valid JSON", "line 3"]),
    "wrong type": (dict(overrides={"train_batch_size": "one"}), ["config.train_batch_size", "an integer"]),
    "unknown method": (dict(overrides={"distillation_method": "dmd2"}), ["config.distillation_method",
                                                                         "did you mean 'dmd'"]),
    "unknown family": (dict(overrides={"model_family": "wan21"}), ["config.model_family", "did you mean 'wan'"]),
    "empty dataset": (dict(dataset="empty"), ["the dataset is empty"]),
    "corrupt media": (dict(dataset="corrupt"), ["broken.png", "corrupt or truncated"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_on_bad_input_exits_2_cleanly(capsys, tmp_path, cli_tiny_wan, case):
    kwargs, fragments = TRAIN_CASES[case]
    overrides = {k: (str(tmp_path / "no-such-model") if v == "MISSING" else v)
                 for k, v in kwargs.get("overrides", {}).items()}
    config, out = make_run(tmp_path, cli_tiny_wan, dataset=kwargs.get("dataset", "good"), overrides=overrides,
                           text=kwargs.get("text"))
    rc, stdout, err = run_cli(capsys, "train", "--config", config)
    assert_user_error(rc, stdout, err, *fragments)
    assert_nothing_half_written(out)
    if "dataset" not in kwargs:  # a config error stops before anything is created
        assert not out.exists()


# --------------------------------------------------------------------------- real processes (two, they are slow)


def _console_script() -> list[str]:
    here = Path(sys.executable).parent / ("simpletuner-dmd.exe" if os.name == "nt" else "simpletuner-dmd")
    found = str(here) if here.exists() else shutil.which("simpletuner-dmd")
    assert found, "the simpletuner-dmd console script is not installed (pip install -e .)"
    return [found]


def test_console_script_exits_2_without_traceback(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**example_config(), "distillation_config": {"genrator_update_interval": 2}}))
    proc = subprocess.run([*_console_script(), "validate-config", str(path), "--no-check-paths"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [
        "error: distillation_config.genrator_update_interval: unknown key (did you mean 'generator_update_interval'?)"]
    assert "Traceback" not in proc.stderr


def test_python_m_train_exits_2_without_traceback(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_family": "wan",\n "seed": }\n')
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "simpletuner_dmd", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "not valid JSON" in lines[0] and "line 2 column" in lines[0]
    assert "Traceback" not in proc.stderr
