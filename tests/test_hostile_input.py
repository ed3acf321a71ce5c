"""Hostile input, property-based: mutated configs, data-backend files and datasets all end with exit status 2.

Every case runs ``simpletuner_dmd.cli.main(["train", "--config", …])`` in-process (or ``validate-config`` for some
config cases) and must end with

* exit status 2, at least one ``error:`` line, the ``error:`` lines last on stderr, and no "Traceback" anywhere;
* nothing written outside the case's ``output_dir`` and cache folders (the case's folder, the shared tiny model and
  the current directory are snapshotted before and after; the repository at the end of the module);
* no checkpoint folder, complete or ``.checkpoint-*.tmp``, in ``output_dir``.

Strategies generate only inputs that are invalid by construction: a wrong type for a key, a value outside its range,
an unknown key, a required key removed, JSON that does not parse, a corrupt or missing file. Where validity cannot be
ruled out by construction (a value in range for one key, a damaged image the decoder still reads), the case is checked
first (the schema's own ``Key.coerce``, the host's own ``load_media``) and discarded with ``assume`` when it turns out
to be valid; an unexpected exception in that check is not discarded, it fails the case.

The tests run as root in CI, where ``chmod 000`` does not stop reads: "unreadable" is then a folder where a file is
expected or a dangling symlink; as another user ``chmod 000`` files are added to the cases.

The base config is ``config_examples/tiny-wan-dmd/config.json`` with its paths rewritten into the case's folder and
``max_train_steps: 1`` (a case that were valid by mistake trains one step and fails the test quickly).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from simpletuner_dmd.cli import main
from simpletuner_dmd.errors import DataError
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA
from simpletuner_dmd.methods.dmd.config import DMD_SCHEMA
from tests.repo_tree import repo_files

WAN_MEDIA = {"frame_stride": WanFamily.frame_stride, "size_multiple": WanFamily.size_multiple}

pytestmark = pytest.mark.slow  # about 2 minutes of property-based cases: `pytest -m slow` or .ci/run

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config_examples" / "tiny-wan-dmd"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# Cases per CI run (hypothesis counts examples that were not discarded by assume).
N_CONFIG = 330
N_BACKEND = 120
N_DATASET = 100
TRIED: dict[str, int] = {"config": 0, "backend": 0, "dataset": 0}
DISCARDED_VALID_MEDIA = [0]

HYPOTHESIS = dict(deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                         HealthCheck.filter_too_much, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- fixtures and the case harness


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def empty_cwd(tmp_path_factory):
    """Every case runs in an empty current directory that must stay empty (relative writes would land there)."""
    cwd = tmp_path_factory.mktemp("hostile-cwd")
    old = os.getcwd()
    os.chdir(cwd)
    yield cwd
    os.chdir(old)


@pytest.fixture(scope="module")
def small_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """Two PNGs and one GIF of the shared tiny dataset, with their captions."""
    folder = tmp_path_factory.mktemp("hostile-data") / "data"
    folder.mkdir()
    pngs = sorted(tiny_dataset.glob("*.png"))[:2]
    gifs = sorted(tiny_dataset.glob("*.gif"))[:1]
    assert pngs and gifs
    for media in [*pngs, *gifs]:
        shutil.copy(media, folder / media.name)
        shutil.copy(media.with_suffix(".txt"), folder / media.with_suffix(".txt").name)
    return folder


def snapshot(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every path under root (links not followed) with its type, size and mtime, except the excluded subtrees."""
    found: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return found
    excluded = {str(p) for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in excluded]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if path in excluded:
                continue
            st_ = os.lstat(path)
            kind = "l" if os.path.islink(path) else ("d" if os.path.isdir(path) else "f")
            found[os.path.relpath(path, root)] = (kind, st_.st_size if kind == "f" else 0,
                                                  st_.st_mtime_ns if kind != "d" else 0)
    return found


def base_config(case: Path, model: Path) -> dict:
    cfg = json.loads((EXAMPLE / "config.json").read_text())
    cfg.update(pretrained_model_name_or_path=str(model), pretrained_t5_model_name_or_path=str(model),
               data_backend_config=str(case / "multidatabackend.json"), output_dir=str(case / "out"),
               max_train_steps=1)
    return cfg


def base_backends(case: Path) -> list[dict]:
    backends = json.loads((EXAMPLE / "multidatabackend.json").read_text())
    for b in backends:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(case / "data")
        b["cache_dir"] = str(case / "cache" / ("text" if b["dataset_type"] == "text_embeds" else "latents"))
    return backends


class Case:
    """One case's folder: a good dataset, the backend file and the config, all inside it."""

    def __init__(self, arena: Path, model: Path, dataset: Path):
        self.dir = Path(tempfile.mkdtemp(dir=arena, prefix="case-"))
        self.model = model
        shutil.copytree(dataset, self.dir / "data")
        self.config_path = self.dir / "config.json"
        self.backends_path = self.dir / "multidatabackend.json"
        self.write_config(base_config(self.dir, model))
        self.write_backends(base_backends(self.dir))

    @property
    def out(self) -> Path:
        return self.dir / "out"

    @property
    def caches(self) -> tuple[Path, ...]:
        return (self.dir / "cache",)

    def write_config(self, cfg) -> None:
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def write_backends(self, backends) -> None:
        self.backends_path.write_text(json.dumps(backends, indent=2))

    def cleanup(self) -> None:
        for dirpath, dirnames, _ in os.walk(self.dir):  # undo chmod 000 before deleting (non-root runs)
            for d in dirnames:
                path = os.path.join(dirpath, d)
                if not os.path.islink(path):
                    with contextlib.suppress(OSError):
                        os.chmod(path, 0o755)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def wandb_env(out: Path):
    """The trainer fills WANDB_* with setdefault; point them into this case's output_dir and restore them after."""
    keys = ("WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(out), WANDB_CACHE_DIR=str(out / "wandb-cache"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(kind: str, case: Case, argv: list[str], cwd: Path) -> list[str]:
    """Run the CLI on one case and check every promise; returns the error lines."""
    model_before = snapshot(case.model)
    before = snapshot(case.dir, exclude=(case.out, *case.caches))
    stdout, stderr = io.StringIO(), io.StringIO()
    with wandb_env(case.out), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)  # any exception but a UserError propagates and fails the case
    TRIED[kind] += 1
    out, err = stdout.getvalue(), stderr.getvalue()
    assert rc == 2, f"exit status {rc}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors, err
    assert lines[-len(errors):] == errors, f"error lines are not the last lines of stderr:\n{err}"
    assert all(len(line) > len("error: ") for line in errors)
    assert snapshot(case.dir, exclude=(case.out, *case.caches)) == before, "a file outside output_dir/cache changed"
    assert snapshot(case.model) == model_before, "the model folder changed"
    assert not os.listdir(cwd), f"files appeared in the current directory: {os.listdir(cwd)}"
    if case.out.exists():
        leftovers = [p for p in case.out.rglob("*") if p.name.startswith(("checkpoint-", ".checkpoint-"))]
        assert leftovers == [], leftovers
        assert not (case.out / "pytorch_lora_weights.safetensors").exists()
    return errors


# --------------------------------------------------------------------------- strategies: values by JSON type

JSON_TYPES = {
    "int": st.integers(-10**12, 10**12),
    "float": st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not float(f).is_integer()),
    "bool": st.booleans(),
    "str": st.text(max_size=12),
    "list": st.lists(st.integers(-3, 3) | st.text(max_size=3) | st.none(), max_size=4),
    "dict": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=3), max_size=3),
    "null": st.none(),
}
# Which JSON types a key's kind accepts (the rest are wrong types by construction).
KIND_ACCEPTS = {"int": {"int"}, "float": {"int", "float"}, "bool": {"bool"}, "str": {"str"}, "list": {"list"}}
PARSED_ACCEPTS = {"fake_score_betas": {"list"}, "dmd_denoising_steps": {"str", "list"},
                  "validation_resolution": {"int", "str"}}

ALL_KEYS = [("host", k) for k in HOST_SCHEMA.keys] + [("dmd", k) for k in DMD_SCHEMA.keys]


def accepts(key, value) -> bool:
    try:
        key.coerce(value)
    except ValueError:
        return False
    return True


@st.composite
def wrong_type(draw, key):
    accepted = set(PARSED_ACCEPTS.get(key.name, KIND_ACCEPTS.get(key.kind, set())))
    if key.nullable:
        accepted.add("null")
    wrong = sorted(set(JSON_TYPES) - accepted)
    value = draw(JSON_TYPES[draw(st.sampled_from(wrong))])
    assume(not accepts(key, value))  # guard only: by construction none of these is accepted
    return value


HOSTILE_STRINGS = ["", " ", ".", "..", "../../escape", "/abs/path", "a/b", "a\\b", "x\x00y", "\x00", "bad\nname"]


@st.composite
def bad_value(draw, key):
    """A value of an accepted type that the key's range, choices or parse rejects (checked, then kept)."""
    if key.choices is not None:
        value = draw(st.text(max_size=12) | st.sampled_from(HOSTILE_STRINGS))
    elif key.name in PARSED_ACCEPTS:
        value = draw(st.one_of(
            st.lists(st.floats(-2, 2) | st.integers(-5, 2000), max_size=5),
            st.text(alphabet="0123456789,x -.", max_size=12), st.integers(-100, 100)))
    elif key.kind == "int":
        value = draw(st.integers(-10**6, 2) | st.sampled_from([-1, 0, 2, 3, 4, 6, 7, 8]))
    elif key.kind == "float":
        value = draw(st.floats(allow_nan=True, allow_infinity=True)
                     | st.sampled_from([-1.0, -1e-9, 0.0, 0.5, 1.0, 1.5, 1e300]))
    else:  # strings with a check: tracker names, paths
        value = draw(st.sampled_from(HOSTILE_STRINGS) | st.text(alphabet="ab./\\\x00 ", max_size=8))
    assume(not accepts(key, value))
    return value


RANGED = [(where, k) for where, k in ALL_KEYS if k.check is not None or k.choices is not None or k.parse is not None]


@st.composite
def config_mutation(draw, seed_text: str, seed: dict):
    """(description, file bytes) of a seed config made invalid one way."""
    kind = draw(st.sampled_from(["wrong_type", "bad_value", "cross", "unknown_dmd_key", "bad_method",
                                 "bad_distillation_config", "missing", "truncated", "garbage", "not_object",
                                 "not_utf8", "deep"]))
    cfg = json.loads(seed_text)
    dc = cfg["distillation_config"]
    if kind in ("wrong_type", "bad_value"):
        where, key = draw(st.sampled_from(ALL_KEYS if kind == "wrong_type" else RANGED))
        value = draw(wrong_type(key) if kind == "wrong_type" else bad_value(key))
        (cfg if where == "host" else dc)[key.name] = value
        return f"{kind} {where}.{key.name}={value!r}", json.dumps(cfg).encode()
    if kind == "cross":
        if draw(st.booleans()):
            cfg.update(max_train_steps=0, num_train_epochs=0)
            return "max_train_steps and num_train_epochs both 0", json.dumps(cfg).encode()
        lo = draw(st.floats(0, 1))
        hi = draw(st.floats(0, lo))
        dc.update(min_timestep_ratio=lo, max_timestep_ratio=hi)
        return f"min_timestep_ratio {lo} >= max {hi}", json.dumps(cfg).encode()
    if kind == "unknown_dmd_key":
        names = set(DMD_SCHEMA.by_name) | {"dmd", "lcm", "dcm"}
        name = draw(st.text(max_size=24).filter(lambda n: n not in names))
        dc[name] = draw(st.integers() | st.text(max_size=5) | st.booleans() | st.none())
        return f"unknown distillation_config key {name!r}", json.dumps(cfg).encode()
    if kind == "bad_method":
        value = draw(st.one_of(st.text(max_size=10).filter(lambda m: m not in ("", "none", "dmd", "lcm", "dcm")),
                               st.integers(), st.lists(st.integers(), max_size=2), st.booleans(),
                               st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
        cfg["distillation_method"] = value
        return f"distillation_method={value!r}", json.dumps(cfg).encode()
    if kind == "bad_distillation_config":
        def parses_to_dict(text):
            import ast
            for parse in (json.loads, ast.literal_eval):
                try:
                    if isinstance(parse(text.strip()), dict):
                        return True
                except Exception:  # noqa: BLE001 - anything that does not parse is what we want
                    pass
            return not text.strip()  # an empty string means "no config": valid

        value = draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                               st.lists(st.integers(), min_size=1, max_size=3),
                               st.text(max_size=20).filter(lambda t: not parses_to_dict(t))))
        cfg["distillation_config"] = value
        return f"distillation_config={value!r}", json.dumps(cfg).encode()
    if kind == "missing":
        required = ["pretrained_model_name_or_path", "data_backend_config"]
        must = draw(st.lists(st.sampled_from(required), min_size=1, unique=True))
        others = draw(st.lists(st.sampled_from(sorted(cfg)), max_size=5, unique=True))
        for name in {*must, *others}:
            cfg.pop(name, None)
        return f"missing {sorted({*must, *others})}", json.dumps(cfg).encode()
    if kind == "truncated":
        text = json.dumps(cfg, indent=2)
        cut = draw(st.integers(0, len(text) - 1))  # strictly shorter than the object: never closed
        return f"truncated at {cut}", text[:cut].encode()
    if kind == "garbage":
        raw = json.dumps(cfg, indent=2).encode()
        pos = draw(st.integers(0, len(raw)))
        junk = draw(st.binary(min_size=1, max_size=8))
        data = raw[:pos] + junk + raw[pos + draw(st.integers(0, 4)):]
        try:
            json.loads(data.decode("utf-8"))
            assume(False)  # still valid JSON: not a malformed-JSON case
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        return f"garbage {junk!r} at {pos}", data
    if kind == "not_object":
        value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
                               st.none(), st.booleans()))
        return f"top level {value!r}", json.dumps(value).encode()
    if kind == "not_utf8":
        return "not UTF-8", b"\xff\xfe" + json.dumps(cfg).encode("utf-16-le")
    depth = draw(st.integers(5_000, 200_000))
    return f"nested {depth} deep", (b"[" * depth + b"]" * depth) if draw(st.booleans()) else b'{"a":' * depth


# --------------------------------------------------------------------------- (a) the config


@settings(max_examples=N_CONFIG, **HYPOTHESIS)
@given(data=st.data())
def test_mutated_config_exits_2(data, arena, empty_cwd, tiny_wan, small_dataset):
    case = Case(arena, tiny_wan, small_dataset)
    try:
        seed_text = case.config_path.read_text()
        what, raw = data.draw(config_mutation(seed_text, json.loads(seed_text)), label="mutation")
        note(what)
        case.config_path.write_bytes(raw)
        command = data.draw(st.sampled_from(["train", "train", "validate-config"]), label="command")
        argv = ["train", "--config", str(case.config_path)] if command == "train" else \
            ["validate-config", str(case.config_path)]
        run_case("config", case, argv, empty_cwd)
    finally:
        case.cleanup()


@pytest.mark.parametrize("where", ["missing", "directory", "dangling symlink"])
def test_config_path_itself_is_hostile(where, arena, empty_cwd, tiny_wan, small_dataset):
    case = Case(arena, tiny_wan, small_dataset)
    try:
        path = case.dir / "hostile.json"
        if where == "directory":
            path.mkdir()
        elif where == "dangling symlink":
            path.symlink_to(case.dir / "nowhere.json")
        run_case("config", case, ["train", "--config", str(path)], empty_cwd)
    finally:
        case.cleanup()


# --------------------------------------------------------------------------- (b) the data-backend file

MEDIA_KEY_BAD = {
    "id": st.one_of(st.just(""), st.integers(), st.none(), st.lists(st.integers(), max_size=2)),
    "dataset_type": st.one_of(st.text(max_size=8).filter(lambda t: t not in ("image", "video", "text_embeds")),
                              st.integers(), st.lists(st.text(max_size=2), max_size=2)),
    "instance_data_dir": st.one_of(st.just(""), st.integers(), st.booleans(), st.lists(st.text(max_size=2))),
    "cache_dir": st.one_of(st.just(""), st.integers(), st.booleans(), st.lists(st.text(max_size=2))),
    "resolution": st.one_of(st.integers(-1000, 15), st.floats(allow_nan=False), st.text(max_size=4), st.booleans()),
    "resolution_type": st.text(max_size=10).filter(lambda t: t not in ("pixel_area", "pixel")),
    "num_frames": st.one_of(st.integers(-100, 0), st.floats(allow_nan=False).filter(lambda f: not f.is_integer()),
                            st.text(max_size=3), st.booleans()),
    "video": st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)),
    "repeats": st.one_of(st.integers(-100, -1), st.floats(allow_nan=False).filter(lambda f: not f.is_integer()),
                         st.text(max_size=3)),
    "type": st.one_of(st.text(max_size=6).filter(lambda t: t != "local"), st.integers()),
    "caption_strategy": st.one_of(st.text(max_size=8).filter(lambda t: t != "textfile"), st.integers()),
    "disabled": st.one_of(st.integers(), st.text(max_size=3), st.none()),
}


@st.composite
def backend_mutation(draw, case: Case):
    backends = base_backends(case.dir)
    kind = draw(st.sampled_from(["bad_key", "missing_key", "duplicate_id", "two_text", "all_disabled", "empty_list",
                                 "not_list", "entry_not_object", "cache_disagree", "frames_disagree",
                                 "bad_text_cache", "missing_dir", "dir_is_file", "truncated", "garbage", "deep"]))
    i = draw(st.sampled_from([0, 1]))  # a media backend (0: video, 1: image)
    media = backends[i]
    if kind == "bad_key":
        key = draw(st.sampled_from(sorted(MEDIA_KEY_BAD)))
        if key == "num_frames" and media["dataset_type"] == "image":
            media.pop("num_frames", None)  # an image backend takes num_frames too; the check is the same
        if key == "disabled" and draw(st.booleans()):
            media[key] = draw(st.integers(2, 9))
        else:
            media[key] = draw(MEDIA_KEY_BAD[key])
        what = f"backend {i} {key}={media[key]!r}"
    elif kind == "missing_key":
        key = draw(st.sampled_from(["instance_data_dir", "cache_dir", "id"]))
        del media[key]
        what = f"backend {i} without {key}"
    elif kind == "duplicate_id":
        backends[1]["id"] = backends[0]["id"]
        what = "duplicate id"
    elif kind == "two_text":
        backends.append({**backends[2], "id": "more-text"})
        what = "two text_embeds backends"
    elif kind == "all_disabled":
        for b in backends[:2]:
            b["disabled"] = True
        what = "every media backend disabled"
    elif kind == "empty_list":
        backends = []
        what = "empty list"
    elif kind == "not_list":
        backends = draw(st.one_of(st.just(backends[0]), st.integers(), st.text(max_size=5), st.none(),
                                  st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
        what = f"top level {backends!r}"
    elif kind == "entry_not_object":
        backends.insert(draw(st.integers(0, 3)), draw(st.one_of(st.integers(), st.text(max_size=4), st.none(),
                                                                st.lists(st.integers(), max_size=2))))
        what = "an entry that is not an object"
    elif kind == "cache_disagree":
        media["cache_dir_vae"] = str(case.dir / "cache" / "other")
        what = "cache_dir_vae and cache_dir differ"
    elif kind == "frames_disagree":
        backends[0]["video"] = {"num_frames": backends[0]["num_frames"] + draw(st.integers(1, 8))}
        what = "num_frames and video.num_frames differ"
    elif kind == "bad_text_cache":
        backends[2]["cache_dir"] = draw(st.one_of(st.just(""), st.integers(), st.lists(st.integers(), max_size=2)))
        what = f"text cache_dir={backends[2]['cache_dir']!r}"
    elif kind == "missing_dir":
        for b in backends[:2]:
            b["instance_data_dir"] = str(case.dir / draw(st.sampled_from(["no-such-folder", "nul\x00dir"])))
        what = "instance_data_dir does not exist"
    elif kind == "dir_is_file":
        for b in backends[:2]:
            b["instance_data_dir"] = str(case.dir / "data" / sorted(os.listdir(case.dir / "data"))[0])
        what = "instance_data_dir is a file"
    if kind in ("truncated", "garbage", "deep"):
        text = json.dumps(backends, indent=2)
        if kind == "truncated":
            cut = draw(st.integers(0, len(text) - 1))
            return f"truncated at {cut}", text[:cut].encode()
        if kind == "deep":
            depth = draw(st.integers(5_000, 200_000))
            return f"nested {depth} deep", b"[" * depth + b"]" * depth
        raw = text.encode()
        pos = draw(st.integers(0, len(raw)))
        junk = draw(st.binary(min_size=1, max_size=8))
        data = raw[:pos] + junk + raw[pos + draw(st.integers(0, 4)):]
        try:
            json.loads(data.decode("utf-8"))
            assume(False)
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        return f"garbage {junk!r} at {pos}", data
    return what, json.dumps(backends).encode()


@settings(max_examples=N_BACKEND, **HYPOTHESIS)
@given(data=st.data())
def test_mutated_backend_file_exits_2(data, arena, empty_cwd, tiny_wan, small_dataset):
    case = Case(arena, tiny_wan, small_dataset)
    try:
        what, raw = data.draw(backend_mutation(case), label="mutation")
        note(what)
        case.backends_path.write_bytes(raw)
        run_case("backend", case, ["train", "--config", str(case.config_path)], empty_cwd)
    finally:
        case.cleanup()


# --------------------------------------------------------------------------- (c) the dataset


def _still_decodes(path: Path) -> bool:
    """Whether the host's own decoder reads the damaged file (then the case is not invalid: discard it)."""
    from simpletuner_dmd.hosts.reference.media_decode import load_media

    backend = {"dataset_type": "image" if path.suffix == ".png" else "video", "resolution": 64,
               "resolution_type": "pixel_area", "num_frames": 9}
    try:
        load_media(path, backend, **WAN_MEDIA)
    except DataError:
        return False
    return True  # any other exception escapes and fails the case: it is a bug


DATASET_KINDS = ["truncate", "overwrite", "random_bytes", "zero_bytes", "empty_caption", "missing_caption",
                 "caption_not_utf8", "caption_is_dir", "caption_dangling_link", "empty_folder", "captions_only",
                 "media_are_dirs", "media_dangling_links", "cache_is_file"]
if not IS_ROOT:
    DATASET_KINDS += ["media_unreadable", "caption_unreadable"]


@st.composite
def dataset_mutation(draw, case: Case) -> str:
    data = case.dir / "data"
    media = sorted(p for p in data.iterdir() if p.suffix in (".png", ".gif"))
    kind = draw(st.sampled_from(DATASET_KINDS))
    target = draw(st.sampled_from(media))
    caption = target.with_suffix(".txt")
    if kind in ("truncate", "overwrite", "random_bytes", "zero_bytes"):
        raw = target.read_bytes()
        if kind == "truncate":
            raw = raw[:draw(st.integers(0, len(raw) - 1))]
        elif kind == "overwrite":
            pos = draw(st.integers(0, len(raw) - 1))
            junk = draw(st.binary(min_size=1, max_size=64))
            raw = raw[:pos] + junk + raw[pos + len(junk):]
        elif kind == "random_bytes":
            raw = draw(st.binary(max_size=512))
        else:
            raw = b""
        target.write_bytes(raw)
        if _still_decodes(target):
            DISCARDED_VALID_MEDIA[0] += 1
            assume(False)
        return f"{kind} {target.name} ({len(raw)} bytes)"
    if kind == "empty_caption":
        caption.write_text(draw(st.sampled_from(["", " ", "\n", "\t \n  "])))
    elif kind == "missing_caption":
        caption.unlink()
    elif kind == "caption_not_utf8":
        raw = draw(st.binary(min_size=1, max_size=32))
        try:
            raw.decode("utf-8")
            raw = b"\xff" + raw
        except UnicodeDecodeError:
            pass
        caption.write_bytes(raw)
    elif kind == "caption_is_dir":
        caption.unlink()
        caption.mkdir()
    elif kind == "caption_dangling_link":
        caption.unlink()
        caption.symlink_to(data / "no-such-caption.txt")
    elif kind == "empty_folder":
        for p in data.iterdir():
            p.unlink()
    elif kind == "captions_only":
        for p in media:
            p.unlink()
    elif kind in ("media_are_dirs", "media_dangling_links"):
        for p in media:
            p.unlink()
            if kind == "media_are_dirs":
                p.mkdir()
            else:
                p.symlink_to(data / f"missing{p.suffix}")
    elif kind == "cache_is_file":
        (case.dir / "cache").write_text("not a folder\n")
    elif kind == "media_unreadable":
        target.chmod(0)
    elif kind == "caption_unreadable":
        caption.chmod(0)
    return f"{kind} {target.name}"


@settings(max_examples=N_DATASET, **HYPOTHESIS)
@given(data=st.data())
def test_mutated_dataset_exits_2_or_skips_the_damaged_file(data, arena, empty_cwd, tiny_wan, small_dataset):
    """A damaged media file is skipped and listed in data_report.json (and kept: delete_problematic_images is off),
    and the run trains on the rest; every other mutation exits 2 with one clear line."""
    case = Case(arena, tiny_wan, small_dataset)
    try:
        mutation = data.draw(dataset_mutation(case), label="mutation")
        note(mutation)
        kind, name = mutation.split(" ")[:2]
        argv = ["train", "--config", str(case.config_path)]
        if kind in DAMAGED_KINDS:
            run_skipped_case(case, argv, empty_cwd, case.dir / "data" / name)
        else:
            run_case("dataset", case, argv, empty_cwd)
    finally:
        case.cleanup()


DAMAGED_KINDS = ("truncate", "overwrite", "random_bytes", "zero_bytes")


def run_skipped_case(case: Case, argv: list[str], cwd: Path, damaged: Path) -> None:
    model_before = snapshot(case.model)
    stdout, stderr = io.StringIO(), io.StringIO()
    with wandb_env(case.out), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    TRIED["dataset"] += 1
    out, err = stdout.getvalue(), stderr.getvalue()
    assert rc == 0, f"exit status {rc}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    report = json.loads((case.out / "data_report.json").read_text())["skipped"]
    assert [Path(item["path"]).name for item in report] == [damaged.name], report
    assert report[0]["deleted"] is False and damaged.exists()
    assert (case.out / "pytorch_lora_weights.safetensors").is_file()
    assert snapshot(case.model) == model_before, "the model folder changed"
    assert not os.listdir(cwd), f"files appeared in the current directory: {os.listdir(cwd)}"


# --------------------------------------------------------------------------- the figures


@pytest.fixture(scope="module", autouse=True)
def repo_unchanged():
    """The repository gains no files while this module runs. New ``.py``/``.md`` files are not counted: the trainer
    never writes those, and people edit the working tree while tests run."""
    before = repo_files()
    yield
    new = sorted(p for p in repo_files() - before if not p.endswith((".py", ".md")))
    assert new == [], f"files appeared in the repository: {new}"


def test_zz_figures(request):
    """Runs last in this file: the number of cases tried (the README quotes it) and the 500-case floor."""
    total = sum(TRIED.values())
    summary = (f"hostile input: {total} cases tried (config {TRIED['config']}, backend file {TRIED['backend']}, "
               f"dataset {TRIED['dataset']}), 0 tracebacks; {DISCARDED_VALID_MEDIA[0]} damaged media files still "
               "decoded and were discarded")
    print(summary)  # shown with -s; also kept in pytest's cache: pytest --cache-show 'hostile_input/*'
    if getattr(request.config, "cache", None) is not None:
        request.config.cache.set("hostile_input/figures", {**TRIED, "total": total, "tracebacks": 0,
                                                           "discarded_valid_media": DISCARDED_VALID_MEDIA[0]})
    if TRIED["config"] == 0 or TRIED["backend"] == 0 or TRIED["dataset"] == 0:
        pytest.skip("only part of this file ran: " + summary)
    assert total >= 500, summary

