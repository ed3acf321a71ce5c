"""The config contract: the seed quickstart's config validates as is, and every bad value is named, all at once."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from simpletuner_dmd.hosts.reference.run_config import load_config, validate_config
from simpletuner_dmd.errors import ConfigError, UserError
from simpletuner_dmd.hookspecs import hookimpl
from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA, SEED_KEYS_NOT_SUPPORTED
from simpletuner_dmd.methods.dmd.config import BLOCK_ONLY_KEYS, DMD_SCHEMA

REPO = Path(__file__).resolve().parents[1]
from simpletuner_dmd.plugins import get_plugin_manager

SEED_NAME = "000_72329bb8002b0f9b.txt"


def _seed_file() -> Path | None:
    here = Path(__file__).resolve()
    candidates = [
        here.parents[2] / "shared" / "seed" / SEED_NAME,  # <workspace>/shared beside <workspace>/<repo>
        Path.cwd().parent / "shared" / "seed" / SEED_NAME,  # ../shared from the repo root
    ]
    return next((p for p in candidates if p.is_file()), None)


def _json_after(text: str, start_marker: str, end_marker: str | None = None) -> dict:
    start = text.index(start_marker) + len(start_marker)
    end = text.index(end_marker, start) if end_marker else len(text)
    chunk = text[start:end]
    obj, _ = json.JSONDecoder().raw_decode(chunk[chunk.index("{"):])
    return obj


QUICKSTART = Path(__file__).resolve().parents[1] / "config_examples" / "wan-dmd-quickstart"


@pytest.fixture(scope="module")
def seed_config() -> dict:
    """The seed quickstart's config.json, kept verbatim in config_examples/ (checked against the seed below)."""
    return json.loads((QUICKSTART / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def seed_advanced() -> dict:
    return json.loads((QUICKSTART / "advanced_distillation_config.json").read_text(encoding="utf-8"))


def test_vendored_quickstart_is_the_seed_verbatim(seed_config, seed_advanced):
    path = _seed_file()
    if path is None:
        pytest.skip(f"the seed quickstart {SEED_NAME} is not in ../shared/seed beside this repository")
    text = path.read_text(encoding="utf-8")
    assert seed_config == _json_after(text, "Edit your config/config.json:", "Key DMD Settings:")
    assert seed_advanced == _json_after(text[text.index("Advanced Options"):], '"distillation_config":')


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(entry_points=False)


def base(**dmd) -> dict:
    """A small valid config (paths are not checked in these tests)."""
    return {
        "model_family": "wan",
        "max_train_steps": 10,
        "learning_rate": 1e-5,  # not above the schema's fake_score_lr: no two-time-scale warning
        "validation_num_inference_steps": 3,
        "distillation_method": "dmd",
        "distillation_config": dict(dmd),
    }


def problems_of(raw, pm) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw, pm, check_paths=False)
    err = info.value
    assert isinstance(err, UserError) and err.exit_code == 2
    assert str(err).splitlines() == err.problems  # one line per problem
    return err.problems


# --------------------------------------------------------------------------- the seed


# Written out, not derived from SEED_KEYS_NOT_SUPPORTED: the seed keys this host does not implement.
SEED_UNSUPPORTED: set[str] = set()  # every seed key is in effect


def test_seed_config_validates_with_exactly_the_expected_warnings(seed_config, pm):
    rc = validate_config(seed_config, pm, check_paths=False)
    assert rc.method_name == "dmd" and rc.family_cls.name == "wan"
    # the seed's critic (fake_score_lr 1e-5) is slower than its student (2e-5): the one measured-effect warning
    two_time_scale = [w for w in rc.warnings if w.startswith("distillation_config.fake_score_lr:")]
    assert len(two_time_scale) == 1
    rest = [w for w in rc.warnings if w not in two_time_scale]
    named = {w.split(":", 1)[0] for w in rest}
    assert named == SEED_UNSUPPORTED
    assert len(rest) == len(SEED_UNSUPPORTED)  # one each
    assert all("not supported" in w for w in rest)
    assert not any(w.startswith("distillation_config.") for w in rest)  # block keys left at defaults
    # the values the seed means
    cfg = rc.method_config
    assert cfg["dmd_denoising_steps"] == [1000, 757, 522]
    assert cfg["fake_score_betas"] == (0.9, 0.999)
    assert cfg["real_score_guidance_scale"] == 3.0 and cfg["generator_update_interval"] == 1
    assert rc.host["validation_resolution"] == (1280, 704)
    assert rc.host["model_type"] == "lora" and rc.host["base_model_precision"] == "int8-quanto"


def test_every_seed_key_is_known(seed_config):
    assert set(seed_config["distillation_config"]) <= set(DMD_SCHEMA.by_name)
    top = set(seed_config) - {"distillation_method", "distillation_config"}
    unknown = {k for k in top if k not in HOST_SCHEMA.by_name and k not in SEED_KEYS_NOT_SUPPORTED}
    assert not unknown, f"seed keys neither implemented nor declared unsupported: {sorted(unknown)}"
    assert SEED_UNSUPPORTED <= set(SEED_KEYS_NOT_SUPPORTED)


def test_seed_advanced_options_validate_and_warn_about_the_block_key(seed_advanced, seed_config, pm):
    advanced = seed_advanced
    assert advanced["dmd_denoising_steps"] == "1000,666,333"
    rc = validate_config({**seed_config, "distillation_config": advanced}, pm, check_paths=False)
    assert rc.method_config["dmd_denoising_steps"] == [1000, 666, 333]
    assert rc.method_config["timestep_shift"] == 7.0
    block = [w for w in rc.warnings if w.startswith("distillation_config.")
             and not w.startswith("distillation_config.fake_score_lr:")]
    assert len(block) == 1 and block[0].startswith("distillation_config.same_step_across_blocks:")


# --------------------------------------------------------------------------- one bad value each


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("dmd_denoising_steps", "1000,522,757", "strictly decreasing"),
        ("dmd_denoising_steps", "1000,1000,522", "strictly decreasing"),
        ("dmd_denoising_steps", "1000,757,0", "(0, 1000]"),
        ("dmd_denoising_steps", "1001,757,522", "(0, 1000]"),
        ("dmd_denoising_steps", "1000,seven,522", "comma-separated integers"),
        ("dmd_denoising_steps", "1000,757.5,522", "comma-separated integers"),
        ("dmd_denoising_steps", [1000, 757.0, 522], "list of integers"),
        ("dmd_denoising_steps", "", "at least one"),
        ("min_timestep_ratio", 1.5, "[0, 1]"),
        ("max_timestep_ratio", -0.1, "[0, 1]"),
        ("generator_update_interval", 0, "[1, inf]"),
        ("generator_update_interval", 2.0, "an integer"),
        ("real_score_guidance_scale", 0.5, "greater than 1"),
        ("fake_score_betas", [0.9], "two numbers"),
        ("fake_score_betas", [0.9, 0.99, 0.999], "two numbers"),
        ("fake_score_betas", [0.9, 1.0], "[0, 1)"),
        ("fake_score_betas", [-0.1, 0.9], "[0, 1)"),
        ("generator_update_interval", True, "an integer"),
        ("num_training_frames", False, "an integer"),
        ("fake_score_lr", "1e-5", "a number"),
        ("timestep_shift", 0.5, "[1, inf]"),
        ("last_step_only", "yes", "true or false"),
        ("fake_score_type", "ful", "did you mean 'full'"),
    ],
)
def test_bad_method_value_is_named(pm, key, value, fragment):
    problems = problems_of(base(**{key: value}), pm)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"distillation_config.{key}:"), problems
    assert fragment in problems[0]


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("learning_rate", "fast", "a number"),
        ("learning_rate", 0, "(0, inf]"),
        ("train_batch_size", True, "an integer"),
        ("validation_resolution", "640x481", "multiples of 16"),
        ("validation_num_video_frames", 8, "1 + 4k"),
        ("model_type", "lorra", "did you mean 'lora'"),
        ("use_ema", 1, "true or false"),
    ],
)
def test_bad_host_value_is_named(pm, key, value, fragment):
    problems = problems_of({**base(), key: value}, pm)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"config.{key}:") and fragment in problems[0]


@pytest.mark.parametrize("lo, hi", [(0.5, 0.5), (0.9, 0.1)])
def test_min_ratio_must_be_below_max_ratio(pm, lo, hi):
    problems = problems_of(base(min_timestep_ratio=lo, max_timestep_ratio=hi), pm)
    assert len(problems) == 1
    assert problems[0].startswith("distillation_config.min_timestep_ratio:") and "max_timestep_ratio" in problems[0]


def test_ratio_window_at_the_edges_is_fine(pm):
    rc = validate_config(base(min_timestep_ratio=0.0, max_timestep_ratio=1.0), pm, check_paths=False)
    assert (rc.method_config["min_timestep_ratio"], rc.method_config["max_timestep_ratio"]) == (0.0, 1.0)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guidance_off_or_above_one_is_fine(pm, scale):
    rc = validate_config(base(real_score_guidance_scale=scale), pm, check_paths=False)
    assert rc.method_config["real_score_guidance_scale"] == scale


def test_unknown_method_key_suggests_the_close_one(pm):
    problems = problems_of(base(genrator_update_interval=2), pm)
    assert problems == ["distillation_config.genrator_update_interval: unknown key "
                        "(did you mean 'generator_update_interval'?)"]


def test_unknown_host_key_is_a_warning_with_a_suggestion(pm):
    rc = validate_config({**base(), "learning_rat": 1e-4}, pm, check_paths=False)
    assert any(w.startswith("learning_rat:") and "did you mean 'learning_rate'" in w for w in rc.warnings)


def test_unknown_method_suggests_the_close_one(pm):
    problems = problems_of({**base(), "distillation_method": "dmdd"}, pm)
    assert len(problems) == 1
    assert problems[0].startswith("config.distillation_method:")
    assert "'dmdd'" in problems[0] and "did you mean 'dmd'" in problems[0]
    assert "installed: dcm, dmd, lcm" in problems[0]


def test_unknown_family_suggests_the_close_one(pm):
    problems = problems_of({**base(), "model_family": "wann"}, pm)
    assert len(problems) == 1
    assert problems[0].startswith("config.model_family:") and "did you mean 'wan'" in problems[0]


def test_no_method_means_plain_fine_tuning(pm):
    raw = {k: v for k, v in base().items() if k != "distillation_method"}
    raw["distillation_config"] = {"generator_update_interval": 2}
    rc = validate_config(raw, pm, check_paths=False)
    assert rc.method_name is None and rc.method_cls is None
    assert any("distillation_config is set but distillation_method is not" in w for w in rc.warnings)


# --------------------------------------------------------------------------- distillation_config forms


def test_keyed_form_is_accepted(pm):
    raw = base()
    raw["distillation_config"] = {"dmd": {"generator_update_interval": 5, "dmd_denoising_steps": "1000,500"}}
    cfg = validate_config(raw, pm, check_paths=False).method_config
    assert cfg["generator_update_interval"] == 5 and cfg["dmd_denoising_steps"] == [1000, 500]
    assert cfg["fake_score_lr"] == DMD_SCHEMA.by_name["fake_score_lr"].default


def test_keyed_form_ignores_sections_of_other_methods(pm):
    raw = base()
    raw["distillation_config"] = {"dmd": {"generator_update_interval": 5}, "lcm": {"num_ddim_timesteps": 50}}
    assert validate_config(raw, pm, check_paths=False).method_config["generator_update_interval"] == 5


def test_keyed_form_validates_the_section(pm):
    raw = base()
    raw["distillation_config"] = {"dmd": {"generator_update_interval": 0}}
    problems = problems_of(raw, pm)
    assert len(problems) == 1 and problems[0].startswith("distillation_config.generator_update_interval:")


def test_mixed_flat_and_keyed_form_is_an_error(pm):
    raw = base()
    raw["distillation_config"] = {"dmd": {"generator_update_interval": 5}, "fake_score_lr": 1e-4}
    problems = problems_of(raw, pm)
    assert len(problems) == 1
    assert problems[0].startswith("distillation_config:") and "mixes" in problems[0]
    assert "fake_score_lr" in problems[0] and "dmd" in problems[0]


def test_distillation_config_as_a_json_string(pm):
    raw = base()
    raw["distillation_config"] = '{"generator_update_interval": 4, "last_step_only": true}'
    cfg = validate_config(raw, pm, check_paths=False).method_config
    assert cfg["generator_update_interval"] == 4 and cfg["last_step_only"] is True


def test_distillation_config_as_a_python_literal_string(pm):
    raw = base()
    raw["distillation_config"] = ("{'generator_update_interval': 4, 'last_step_only': True, "
                                  "'fake_score_betas': (0.5, 0.9), 'dmd_denoising_steps': '1000,500'}")
    cfg = validate_config(raw, pm, check_paths=False).method_config
    assert cfg["generator_update_interval"] == 4 and cfg["last_step_only"] is True
    assert cfg["fake_score_betas"] == (0.5, 0.9) and cfg["dmd_denoising_steps"] == [1000, 500]


def test_distillation_config_string_still_validated(pm):
    raw = base()
    raw["distillation_config"] = '{"generator_update_interval": 0}'
    problems = problems_of(raw, pm)
    assert len(problems) == 1 and problems[0].startswith("distillation_config.generator_update_interval:")


# --------------------------------------------------------------------------- one flat config, any method


def other_method_warnings(rc) -> list[str]:
    return [w for w in rc.warnings if w.startswith("distillation_config: ") and " not apply to " in w]


@pytest.mark.parametrize("method", ["dmd", "lcm", "dcm"])
def test_quickstart_flat_config_validates_for_every_method_with_only_the_method_changed(seed_config, pm, method):
    from simpletuner_dmd.plugins import registered_methods

    rc = validate_config({**seed_config, "distillation_method": method}, pm, check_paths=False)
    assert rc.method_name == method
    ignored = other_method_warnings(rc)
    if method == "dmd":
        assert ignored == []
        assert rc.method_config["dmd_denoising_steps"] == [1000, 757, 522]
        return
    # the quickstart's 21 DMD keys: one warning, one line, naming dmd and the method they do not apply to
    assert len(seed_config["distillation_config"]) == 21
    assert ignored == [f"distillation_config: 21 keys of method dmd (dmd_denoising_steps, generator_update_interval, "
                       f"real_score_guidance_scale, …) do not apply to {method} and are ignored"]
    # none of them reached the method: its config is its schema's defaults
    assert rc.method_config == registered_methods(pm)[method].cls.schema.defaults()


def test_flat_keys_of_two_other_methods_give_one_warning_each(pm):
    raw = base(generator_update_interval=2, fake_score_lr=1e-4, w_min=2.0, euler_timesteps=40)
    raw["distillation_method"] = "lcm"
    rc = validate_config(raw, pm, check_paths=False)
    assert rc.method_config["w_min"] == 2.0  # lcm's own key acts
    assert other_method_warnings(rc) == [
        "distillation_config: 2 keys of method dmd (generator_update_interval, fake_score_lr) do not apply to lcm "
        "and are ignored",
        "distillation_config: 1 key of method dcm (euler_timesteps) does not apply to lcm and is ignored",
    ]


@pytest.mark.parametrize("method, hint", [
    ("dmd", "(did you mean 'fake_score_lr'?)"),
    ("lcm", "(did you mean 'fake_score_lr', a key of method dmd?)"),
    ("dcm", "(did you mean 'fake_score_lr', a key of method dmd?)"),
])
def test_a_misspelt_key_stays_an_error_with_its_suggestion(seed_config, pm, method, hint):
    flat = {**seed_config["distillation_config"], "fake_score_lrr": 1e-4}
    problems = problems_of({**seed_config, "distillation_method": method, "distillation_config": flat}, pm)
    assert problems == [f"distillation_config.fake_score_lrr: unknown key {hint}"]


def test_a_key_no_method_knows_stays_an_error(pm):
    raw = {**base(generator_update_interval=2, zzz_not_a_key=1), "distillation_method": "lcm"}
    assert problems_of(raw, pm) == ["distillation_config.zzz_not_a_key: unknown key"]


@pytest.mark.parametrize("spelling, name", [("DMD", "dmd"), ("Lcm", "lcm"), (" dcm ", "dcm")])
def test_method_names_match_without_regard_to_case(pm, spelling, name):
    from simpletuner_dmd.config import validate_method_config
    from simpletuner_dmd.plugins import registered_methods

    rc = validate_config({**base(), "distillation_method": spelling}, pm, check_paths=False)
    assert rc.method_name == name and rc.method_cls is registered_methods(pm)[name].cls
    selection, problems = validate_method_config(spelling, {}, pm)
    assert not problems and selection.name == name


def test_method_names_differing_only_in_case_are_refused_at_start_up():
    from simpletuner_dmd.errors import PluginError
    from simpletuner_dmd.plugins import registered_methods

    class Shouting:
        name = "DMD"
        schema = DMD_SCHEMA

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Shouting)

    with pytest.raises(PluginError, match="registered twice.*without regard to case"):
        registered_methods(get_plugin_manager(entry_points=False, extra=[Plugin()]))


@pytest.mark.parametrize("value, fragment", [
    ("generator_update_interval=4", "JSON object or a Python dict literal"),
    ("[1, 2]", "must be an object, got list"),
    (42, "must be an object, got int"),
])
def test_distillation_config_that_is_not_an_object(pm, value, fragment):
    raw = base()
    raw["distillation_config"] = value
    problems = problems_of(raw, pm)
    assert len(problems) == 1 and problems[0].startswith("distillation_config:") and fragment in problems[0]


# --------------------------------------------------------------------------- files and the top level


def test_malformed_json_file_reports_line_and_column(tmp_path, pm):
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_family": "wan",\n  "seed": 1,,\n  "learning_rate": 1e-4\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, pm, check_paths=False)
    (problem,) = info.value.problems
    assert str(path) in problem and "not valid JSON" in problem
    assert re.search(r"line 3 column \d+", problem)


def test_missing_config_file(tmp_path, pm):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.json", pm)


@pytest.mark.parametrize("top", [[1, 2], "config", 3, None])
def test_non_object_top_level(pm, top):
    problems = problems_of(top, pm)
    assert len(problems) == 1 and problems[0].startswith("config: must be a JSON object")


def test_non_object_top_level_in_a_file(tmp_path, pm):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        load_config(path, pm, check_paths=False)


def test_many_problems_reported_together(pm):
    raw = base(generator_update_interval=0, fake_score_betas=[0.9], dmd_denoising_steps="1000,1000")
    raw.update(learning_rate="fast", model_family="wann", train_batch_size=0)
    problems = problems_of(raw, pm)
    named = sorted(p.split(":", 1)[0] for p in problems)
    assert named == sorted([
        "distillation_config.generator_update_interval", "distillation_config.fake_score_betas",
        "distillation_config.dmd_denoising_steps", "config.learning_rate", "config.model_family",
        "config.train_batch_size",
    ])


def test_check_paths_names_missing_model_and_data(tmp_path, pm):
    raw = {**base(), "pretrained_model_name_or_path": str(tmp_path / "no-model"),
           "data_backend_config": str(tmp_path / "no-data.json")}
    with pytest.raises(ConfigError) as info:
        validate_config(raw, pm, check_paths=True)
    named = sorted(p.split(":", 1)[0] for p in info.value.problems)
    assert named == ["config.data_backend_config", "config.pretrained_model_name_or_path"]


def _paths_config(tmp_path: Path, output_dir: Path) -> Path:
    """A config whose model folder and backend file exist, so its output_dir decides whether it validates."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    backends = tmp_path / "backends.json"
    backends.write_text((REPO / "config_examples" / "tiny-wan-dmd" / "multidatabackend.json").read_text())
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**base(), "pretrained_model_name_or_path": str(model),
                                  "data_backend_config": str(backends), "output_dir": str(output_dir)}))
    return config


@pytest.mark.parametrize("case", ["an existing file", "a file as parent", "a dangling symlink"])
def test_an_output_dir_that_cannot_be_a_folder_is_one_error_line(tmp_path, capsys, case):
    """``validate-config`` and ``train`` (before it loads anything) both stop with one ``error:`` line, exit 2."""
    from simpletuner_dmd.cli import main

    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    output_dir, expected = {
        "an existing file": (blocker, f"{blocker} is a file, not a folder"),
        "a file as parent": (blocker / "runs" / "out", f"cannot create the folder {blocker / 'runs' / 'out'}: "
                                                        f"{blocker} is not a folder"),
        "a dangling symlink": (link, f"{link} is a dangling symlink, not a folder"),
    }[case]
    config = _paths_config(tmp_path, output_dir)
    for argv in (["validate-config", str(config)], ["train", "--config", str(config)]):
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 2, (argv, out, err)
        assert [line for line in err.splitlines() if line.startswith("error: ")] == [
            f"error: config.output_dir: {expected}"], err
        assert "Traceback" not in err and "ok:" not in out
    assert blocker.read_text() == "a file, not a folder" and not (tmp_path / "nowhere").exists()


def test_an_output_dir_to_be_created_or_already_there_passes_the_path_check(tmp_path, pm):
    for output_dir in (tmp_path / "new" / "deeper" / "out", tmp_path):
        raw = json.loads(_paths_config(tmp_path, output_dir).read_text())
        problems = []
        try:
            validate_config(raw, pm, check_paths=True)
        except ConfigError as exc:
            problems = exc.problems
        assert not [p for p in problems if p.startswith("config.output_dir")], problems
    assert not (tmp_path / "new").exists()  # validation creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_output_dir_is_a_config_error(tmp_path, pm):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for output_dir in (locked, locked / "out"):
            with pytest.raises(ConfigError) as info:
                validate_config(json.loads(_paths_config(tmp_path, output_dir).read_text()), pm, check_paths=True)
            assert info.value.problems == [f"config.output_dir: cannot write into {locked} (no permission, or a "
                                           "read-only file system)"]
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- block keys


NON_DEFAULT_BLOCK = {"num_frame_per_block": 4, "independent_first_frame": True, "same_step_across_blocks": True,
                     "context_noise": 100, "kv_cache_window": 6}


@pytest.mark.parametrize("key", sorted(NON_DEFAULT_BLOCK))
def test_block_key_on_bidirectional_wan_warns_once_by_name(pm, key):
    rc = validate_config(base(**{key: NON_DEFAULT_BLOCK[key]}), pm, check_paths=False)
    block = [w for w in rc.warnings if w.startswith("distillation_config.")]
    assert block == [w for w in block if w.startswith(f"distillation_config.{key}:")] and len(block) == 1
    assert "no effect" in block[0] and "'wan'" in block[0]


def test_all_block_keys_warn_together_and_defaults_do_not(pm):
    assert set(NON_DEFAULT_BLOCK) == set(BLOCK_ONLY_KEYS)
    rc = validate_config(base(**NON_DEFAULT_BLOCK), pm, check_paths=False)
    named = sorted(w.split(":", 1)[0] for w in rc.warnings)
    assert named == sorted(f"distillation_config.{k}" for k in NON_DEFAULT_BLOCK)
    defaults = {k: DMD_SCHEMA.by_name[k].default for k in NON_DEFAULT_BLOCK}
    assert validate_config(base(**defaults), pm, check_paths=False).warnings == []


def test_a_critic_slower_than_the_student_warns_by_name_with_the_measured_effect(pm):
    quickstart = json.loads((REPO / "config_examples/wan-dmd-quickstart/config.json").read_text())
    rc = validate_config(quickstart, pm, check_paths=False)
    (line,) = [w for w in rc.warnings if w.startswith("distillation_config.fake_score_lr:")]
    assert "1e-05 is below learning_rate 2e-05" in line and "recall 0.12" in line and "fake_score_lr >= learning_rate" in line
    same = validate_config({**base(fake_score_lr=2e-5), "learning_rate": 2e-5}, pm, check_paths=False)
    assert same.warnings == []


def test_keys_that_act_on_a_bidirectional_model_do_not_warn(pm):
    rc = validate_config(base(last_step_only=True, num_training_frames=5), pm, check_paths=False)
    assert rc.warnings == []


class _CausalFamily:
    name = "causal-test"
    summary = "a block-causal test family"
    causal = True


class _CausalPlugin:
    @hookimpl
    def register_model_families(self, register):
        register(_CausalFamily)


def test_block_keys_do_not_warn_on_a_causal_family():
    pm = get_plugin_manager(entry_points=False, extra=[_CausalPlugin()])
    rc = validate_config({**base(**NON_DEFAULT_BLOCK), "model_family": "causal-test"}, pm, check_paths=False)
    assert rc.family_cls is _CausalFamily
    assert rc.warnings == []


def test_quickstart_backend_file_validates_with_warnings_for_unimplemented_keys():
    from simpletuner_dmd.hosts.reference.backends import load_backend_config

    warned: list[str] = []
    backends = load_backend_config(QUICKSTART / "multidatabackend.json", warn=warned.append)
    assert [b["dataset_type"] for b in backends] == ["video", "text_embeds"]
    for key in ("crop", "frame_interval"):
        assert sum(f"'{key}'" in w for w in warned) == 1, (key, warned)
