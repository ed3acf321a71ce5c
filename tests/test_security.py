"""Security: checkpoint state is never unpickled, no remote code runs, and config paths cannot move the trainer's writes
out of ``output_dir`` and the cache folders.

* The package's source is scanned with ``ast``: no ``torch.load`` without ``weights_only=True``, no pickle-family
  module, no ``numpy.load(allow_pickle=True)``, no ``trust_remote_code`` other than ``False``, no accelerate
  ``load_state`` (it unpickles random states).
* Two real trainings on the tiny model: the first with hostile-but-valid names (prompt-library names and backend ids
  with ``../`` and ``/``, tracker names with dots and spaces) and the tensorboard tracker; the second resumes from the
  first's checkpoint by an absolute path *outside* its own ``output_dir``, with poisoned pickle files planted in that
  checkpoint under the names other trainers use. Every file either run writes lives in its ``output_dir`` or the cache
  folders; the first run's folder is unchanged by the second; no planted pickle runs; every ``from_pretrained`` call
  is recorded and none passes ``trust_remote_code``; ``torch.load`` is never called without ``weights_only=True``.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest

from simpletuner_dmd.cli import main
from tests.repo_tree import repo_files

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "simpletuner_dmd"
EXAMPLE = REPO / "config_examples" / "tiny-wan-dmd"

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# --------------------------------------------------------------------------- the source scan


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Every place in ``source`` that could unpickle or run remote code, as "file:line: what"."""
    tree = ast.parse(source, filename)
    torch_load_names = {"torch.load"}  # dotted names that mean torch.load here
    problems = []

    def where(node) -> str:
        return f"{filename}:{node.lineno}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{where(node)}: import {alias.name}")
                if alias.name == "torch" and alias.asname:
                    torch_load_names.add(f"{alias.asname}.load")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                problems.append(f"{where(node)}: from {node.module} import …")
            if node.module == "torch":
                torch_load_names.update(a.asname or a.name for a in node.names if a.name == "load")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if name in torch_load_names:
            weights_only = kwargs.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                problems.append(f"{where(node)}: {name}(…) without weights_only=True")
        if name.endswith("np.load") or name.endswith("numpy.load"):
            allow = kwargs.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{where(node)}: {name}(allow_pickle=…)")
        if "trust_remote_code" in kwargs:
            value = kwargs["trust_remote_code"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                problems.append(f"{where(node)}: trust_remote_code={ast.unparse(value)}")
        if name.endswith(".load_state") and "accelerator" in name:
            problems.append(f"{where(node)}: {name}(…) (accelerate unpickles random states)")
    return problems


def test_the_scanner_finds_what_it_looks_for():
    bad = """
import pickle
import torch as T
from torch import load as tl
from dill import loads
T.load("x")
tl("y", weights_only=False)
torch.load("z", map_location="cpu")
np.load("a", allow_pickle=True)
AutoModel.from_pretrained("m", trust_remote_code=True)
accelerator.load_state("d")
"""
    found = unsafe_calls(bad)
    assert [f.split(":")[1] for f in found] == [str(n) for n in range(2, 12) if n not in (3, 4)], found
    good = """
import torch
torch.load("z", weights_only=True, map_location="cpu")
np.load("a")
AutoModel.from_pretrained("m", trust_remote_code=False)
"""
    assert unsafe_calls(good) == []


def test_package_source_never_unpickles_or_trusts_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = [p for f in files for p in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert problems == []


# --------------------------------------------------------------------------- config names that are paths


@pytest.mark.parametrize("key, value", [
    ("tracker_project_name", "../../escape"),
    ("tracker_project_name", "/tmp/escape"),
    ("tracker_project_name", ".."),
    ("tracker_project_name", "a/b"),
    ("tracker_project_name", "a\\b"),
    ("tracker_run_name", "runs/one"),
    ("tracker_run_name", "../x"),
    ("output_dir", ""),
    ("output_dir", "out\x00put"),
    ("data_backend_config", "x\x00.json"),
])
def test_names_that_are_paths_are_config_errors(key, value, tmp_path, capsys):
    cfg = json.loads((EXAMPLE / "config.json").read_text())
    cfg[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    capsys.readouterr()
    rc = main(["validate-config", str(path), "--no-check-paths"])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors and all(line.startswith(f"error: config.{key}: ") for line in errors), err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- real runs: where files land


def snapshot(root: Path) -> dict[str, tuple]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (os.path.isdir(path), st.st_size, st.st_mtime_ns)
    return found


def changed(before: dict, after: dict) -> list[str]:
    """Paths created, deleted or modified (folders count only when created or deleted)."""
    return sorted(p for p in set(before) | set(after)
                  if before.get(p) != after.get(p) and not (p in before and p in after and after[p][0]))


class Poison:
    """Unpickling this writes a marker file: proof that someone unpickled a checkpoint file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_hostile_names_and_outside_resume_write_only_into_output_and_cache(job, tmp_path, tiny_wan, tiny_dataset,  # noqa: F811
                                                                        monkeypatch):
    import torch

    from simpletuner_dmd.hosts.reference.trainer import train

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_MODE", "offline")

    # hostile-but-valid names: prompt-library names and backend ids that look like paths, dotted tracker names
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"../../escape-prompt": "a red digit", "/tmp/abs-prompt": "a blue digit",
                                   "..": "a green digit"}))
    backends_file = tmp_path / "backends.json"  # written by the job fixture
    config = job(max_train_steps=1, checkpoint_step_interval=1, report_to="tensorboard",
                 tracker_project_name="..escape..", tracker_run_name="run .. name",
                 validation_prompt_library=str(library), validation_num_inference_steps=1)
    backends = json.loads(backends_file.read_text())
    for i, b in enumerate(backends):
        b["id"] = ["../../escape-id", "/tmp/abs-id", "a/../../b"][i % 3]
    backends_file.write_text(json.dumps(backends))

    repo_before = repo_files()
    shared_before = (snapshot(tiny_wan), snapshot(tiny_dataset))
    out1, cache = tmp_path / "out", tmp_path / "cache"
    before = snapshot(tmp_path)
    assert train(config) == out1
    after = snapshot(tmp_path)
    outside = [p for p in changed(before, after)
               if not (tmp_path / p).is_relative_to(out1) and not (tmp_path / p).is_relative_to(cache)]
    assert outside == []
    assert (out1 / "checkpoint-1" / "checkpoint.json").is_file()
    assert list((out1 / "..escape..").rglob("events.out.tfevents.*"))  # tensorboard stayed inside output_dir
    prompt_folders = {p.name for p in (out1 / "validation" / "step-1").iterdir()}
    assert prompt_folders and all("/" not in name and name not in (".", "..") for name in prompt_folders)

    # resume from that checkpoint, given as an absolute path outside the second run's output_dir, with poisoned
    # pickles planted in it under the names accelerate, diffusers and other trainers use
    ckpt = out1 / "checkpoint-1"
    marker = tmp_path / "UNPICKLED"
    for name in ("random_states_0.pkl", "optimizer.bin", "scheduler.bin", "pytorch_model.bin", "custom_checkpoint_0.pkl",
                 "dmd/fake_score.pt", "dmd/fake_score_optimizer.bin", "training_state.pt"):
        (ckpt / name).write_bytes(pickle.dumps(Poison(marker)))
    loads: list[dict] = []
    real_torch_load = torch.load

    def spy_torch_load(*args, **kwargs):
        loads.append(kwargs)
        return real_torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_torch_load)
    pretrained: list[tuple[str, dict]] = []
    _spy_from_pretrained(monkeypatch, pretrained)

    out2 = tmp_path / "out2"
    monkeypatch.setenv("WANDB_DIR", str(out2))  # what the trainer sets when unset; set here so it does not leak
    monkeypatch.setenv("WANDB_CACHE_DIR", str(out2 / "wandb-cache"))
    config2 = job(max_train_steps=2, checkpoint_step_interval=1, report_to="wandb", output_dir=str(out2),
                  tracker_project_name="..escape..", tracker_run_name="run .. name",
                  resume_from_checkpoint=str(ckpt), validation_disable=True)
    backends_file.write_text(json.dumps(backends))
    before = snapshot(tmp_path)
    assert train(config2) == out2
    after = snapshot(tmp_path)
    outside = [p for p in changed(before, after)
               if not (tmp_path / p).is_relative_to(out2) and not (tmp_path / p).is_relative_to(cache)]
    assert outside == [], "the resumed run wrote outside its output_dir and the cache (e.g. into the checkpoint)"
    assert (out2 / "checkpoint-2" / "checkpoint.json").is_file()
    assert list(out2.glob("wandb/offline-run-*"))
    assert not marker.exists(), "a planted pickle was unpickled"
    assert all(kw.get("weights_only") is True for kw in loads), loads
    assert pretrained, "no from_pretrained call was recorded: the spy is not in the loading path"
    assert [(cls, kw) for cls, kw in pretrained if kw.get("trust_remote_code")] == []

    assert os.listdir(cwd) == []
    assert (snapshot(tiny_wan), snapshot(tiny_dataset)) == shared_before
    new = sorted(p for p in repo_files() - repo_before if not p.endswith((".py", ".md")))
    assert new == [], f"files appeared in the repository: {new}"


def _spy_from_pretrained(monkeypatch, record: list) -> None:
    """Record the keyword arguments of every from_pretrained the trainer reaches (diffusers models, transformers
    models and tokenizers)."""
    import diffusers
    import transformers

    for owner in (diffusers.ModelMixin, transformers.PreTrainedModel, transformers.AutoTokenizer,
                  transformers.PreTrainedTokenizerBase):
        original = owner.__dict__["from_pretrained"].__func__

        def spy(cls, *args, __original=original, **kwargs):
            record.append((cls.__name__, dict(kwargs)))
            return __original(cls, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(spy))
