"""Config as a schema: every key has a type, a default, a range and one line of help; all errors are reported together.

What every host shares: the schema machinery (``Key``, ``Schema``, checks and parsers), reading a JSON config
(``read_json``), and ``validate_method_config`` — the one validation of ``distillation_method`` and its
``distillation_config`` (an object or a string; flat or keyed by method) that the reference host
(``hosts/reference/run_config.load_config``, which also validates its own host keys) and the SimpleTuner bridge
(``hosts/simpletuner/preflight.py``, ``distiller.py``) call. Nothing loads weights here, so validation is instant.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import ConfigError
from .plugins import find_method, registered_methods

# --------------------------------------------------------------------------- schema machinery

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Key:
    """One config key. ``kind`` is one of "int", "float", "bool", "str", "list", "dict", "any"; ``parse`` turns an
    accepted alternative spelling into the canonical value (e.g. "1000,757,522" into a list of ints) and raises
    ValueError with a message on bad input; ``check`` returns a problem (without the key name) or None. A
    ``required`` key has no default: leaving it out is a problem that quotes its help."""

    name: str
    kind: str
    default: Any
    help: str
    check: Check | None = None
    parse: Callable[[Any], Any] | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    required: bool = False

    def coerce(self, value: Any) -> Any:
        """The canonical value, or raise ValueError(problem)."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError("must not be null")
        if self.parse is not None:
            value = self.parse(value)
        elif not _is_kind(value, self.kind):
            raise ValueError(f"must be {_KIND_WORDS[self.kind]}, got {type(value).__name__} {value!r}")
        if self.kind == "float" and value is not None:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}{hint}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ValueError(problem)
        return value


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "list": "a list", "any": "a value", "dict": "an object"}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if isinstance(value, bool):
        return kind == "bool"
    return {
        "int": isinstance(value, int),
        "float": isinstance(value, (int, float)),
        "bool": False,
        "str": isinstance(value, str),
        "list": isinstance(value, (list, tuple)),
        "dict": isinstance(value, dict),
    }[kind]


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
             ) -> Check:
    def check(v: Any) -> str | None:
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            return f"must be in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}, got {v!r}"
        return None

    return check


@dataclass(frozen=True)
class Schema:
    """A method's (or the host's) keys, plus checks that involve several keys (each returns problems, named)."""

    keys: tuple[Key, ...]
    cross_checks: tuple[Callable[[dict[str, Any]], list[str]], ...] = ()

    def __post_init__(self) -> None:
        names = [k.name for k in self.keys]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate keys in schema: {names}")

    @property
    def by_name(self) -> dict[str, Key]:
        return {k.name: k for k in self.keys}

    def defaults(self) -> dict[str, Any]:
        return {k.name: k.default for k in self.keys}

    def validate(self, raw: Mapping[str, Any], *, prefix: str, unknown: str = "error",
                 known_elsewhere: Mapping[str, str] | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
        """Return (values with defaults filled in, problems, unknown key names). Problems name ``prefix.key``.
        ``known_elsewhere`` maps key names of other schemas to their owner (e.g. "method dmd"): an unknown key with
        no close match here is suggested the close one of those, naming its owner."""
        keys = self.by_name
        values = self.defaults()
        problems: list[str] = []
        unknown_keys: list[str] = []
        for name, value in raw.items():
            key = keys.get(name)
            if key is None:
                unknown_keys.append(name)
                if unknown == "error":
                    hint = suggest(name, keys) or _suggest_elsewhere(name, known_elsewhere or {})
                    problems.append(f"{prefix}.{name}: unknown key{hint}")
                continue
            try:
                values[name] = key.coerce(value)
            except ValueError as exc:
                problems.append(f"{prefix}.{name}: {exc}")
        for key in self.keys:
            if key.required and key.name not in raw:
                problems.append(f"{prefix}.{key.name}: required ({key.help.rstrip('.')})")
        if not problems:
            for cross in self.cross_checks:
                problems.extend(f"{prefix}.{p}" for p in cross(values))
        return values, problems, unknown_keys


def suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _suggest_elsewhere(name: str, owners: Mapping[str, str]) -> str:
    close = difflib.get_close_matches(name, list(owners), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}, a key of {owners[close[0]]}?)" if close else ""


def parse_timestep_list(value: Any) -> list[int]:
    """"1000,757,522" or [1000, 757, 522] → [1000, 757, 522]: strictly decreasing, each in (0, 1000]."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            steps = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"must be comma-separated integers like \"1000,757,522\", got {value!r}") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        steps = list(value)
    else:
        raise ValueError(f"must be a string like \"1000,757,522\" or a list of integers, got {value!r}")
    if not steps:
        raise ValueError("must hold at least one timestep")
    if any(not 0 < s <= 1000 for s in steps):
        raise ValueError(f"each timestep must be in (0, 1000], got {steps}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {steps}")
    return steps


def parse_betas(value: Any) -> tuple[float, float]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if not ok:
        raise ValueError(f"must be a list of two numbers like [0.9, 0.999], got {value!r}")
    b1, b2 = float(value[0]), float(value[1])
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
    return (b1, b2)


# --------------------------------------------------------------------------- reading a host config


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{what}: file not found: {path}"]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{what}: cannot read {path}: {exc}"]) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{what}: {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
                          ) from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ConfigError([f"{what}: {path} nests arrays or objects too deeply to read"]) from None


def parse_distillation_config(raw: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """``distillation_config`` as an object, or as a string holding a JSON object or a Python-literal dict (SimpleTuner
    turns config values into CLI strings, so users of it must write the string form)."""
    if raw is None:
        return {}, []
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            return {}, []
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            try:
                raw = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return None, ["distillation_config: a string must hold a JSON object or a Python dict literal"]
    if not isinstance(raw, dict):
        return None, [f"distillation_config: must be an object, got {type(raw).__name__}"]
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        return None, [f"distillation_config: keys must be strings, got {bad!r}"]
    return raw, []


def select_method_section(method: str, raw: dict[str, Any], schemas: Mapping[str, Schema]
                          ) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """The selected method's section of ``distillation_config``, from the flat form (``{"dmd_denoising_steps": …}``)
    or the keyed form (``{"dmd": {…}, "lcm": {…}}``) explicitly; a mix of both is an error (SimpleTuner silently
    merges them). ``schemas``: every installed method's schema by name (``method`` among them).

    In the flat form, keys that another installed method's schema knows and the selected one does not are left out
    of the section, with one warning per method naming them (so one flat config serves every method with only
    ``distillation_method`` changed); a key no installed method knows stays in the section, for the schema to refuse.

    Returns (the section or None, problems, warnings)."""
    if not any(k in schemas and isinstance(v, dict) for k, v in raw.items()):
        section, ignored = split_other_methods_keys(method, raw, schemas)
        return section, [], ignored_keys_warnings(method, ignored)
    # Keyed form: every object-valued key is one method's section (sections of methods not installed here, such as
    # "lcm", are ignored); any other key is a flat key mixed in.
    keyed = [k for k, v in raw.items() if isinstance(v, dict)]
    flat = [k for k in raw if k not in keyed]
    if flat:
        return None, [
            f"distillation_config: mixes the flat form (keys {', '.join(sorted(flat))}) with the keyed-by-method form "
            f"(keys {', '.join(sorted(keyed))}); use one"
        ], []
    return dict(raw.get(method, {})), [], []


def split_other_methods_keys(method: str, raw: Mapping[str, Any], schemas: Mapping[str, Schema]
                             ) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A flat section split into (the keys for ``method``: its own and the ones no installed method knows, the
    other methods' keys by the method they are ascribed to). A key several other methods know goes to the method that
    accounts for the most of the ignored keys (a greedy cover, ties by name), so a whole flat config of one method
    is ascribed to that method alone."""
    own = schemas[method].by_name
    owners = {name: {m for m, schema in schemas.items() if m != method and name in schema.by_name}
              for name in raw if name not in own}
    owners = {name: found for name, found in owners.items() if found}
    section = {name: value for name, value in raw.items() if name not in owners}
    ignored: dict[str, list[str]] = {}
    left = [name for name in raw if name in owners]
    while left:
        best = max(sorted({m for name in left for m in owners[name]}),
                   key=lambda m: sum(m in owners[name] for name in left))  # max keeps the first (by name) of ties
        ignored[best] = [name for name in left if best in owners[name]]
        left = [name for name in left if best not in owners[name]]
    return section, ignored


IGNORED_KEYS_LISTED = 3  # how many of the ignored keys a warning names before "…"


def ignored_keys_warnings(method: str, ignored: Mapping[str, list[str]]) -> list[str]:
    """One line per other method whose keys a flat ``distillation_config`` holds for ``method``."""
    lines = []
    for other, names in ignored.items():
        shown = ", ".join(names[:IGNORED_KEYS_LISTED]) + (", …" if len(names) > IGNORED_KEYS_LISTED else "")
        count, verb = (f"{len(names)} keys", "do") if len(names) != 1 else ("1 key", "does")
        lines.append(f"distillation_config: {count} of method {other} ({shown}) {verb} not apply to {method} and "
                     f"{'are' if verb == 'do' else 'is'} ignored")
    return lines


@dataclass
class MethodSelection:
    """A method chosen by ``distillation_method`` with its validated ``distillation_config`` section."""

    name: str
    cls: type
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def validate_method_config(method_name: Any, distillation_config: Any, pm: Any, *, family_cls: type | None = None,
                           host: Mapping[str, Any] | None = None) -> tuple[MethodSelection | None, list[str]]:
    """The one method-config validation every host calls: the method registered as ``method_name`` (matched without
    regard to case: ``plugins.find_method``), its section of ``distillation_config`` (an object or a string holding
    one; flat or keyed by method, never mixed) validated by the method's schema, and the method's
    ``config_warnings`` for ``family_cls`` and the ``host`` config when given. In the flat form, other installed
    methods' keys are ignored with one warning per method (``select_method_section``).

    Returns (the selection or None, every problem as one line naming its key); the selection's ``name`` is the
    registered name."""
    methods = registered_methods(pm)
    name = find_method(method_name, methods)
    if name is None:
        return None, [f"config.distillation_method: unknown method {method_name!r}"
                      f"{suggest(str(method_name), methods)}; installed: {', '.join(methods) or 'none'}"]
    method_cls = methods[name].cls
    schemas = {m: entry.cls.schema for m, entry in methods.items()}
    section, problems = parse_distillation_config(distillation_config)
    warnings: list[str] = []
    if section is not None:
        section, problems, warnings = select_method_section(name, section, schemas)
    if problems:
        return None, problems
    elsewhere = {key.name: f"method {m}" for m in sorted(schemas, reverse=True) if m != name
                 for key in schemas[m].keys}  # (the first method by name wins a key several know)
    values, problems, _ = method_cls.schema.validate(section, prefix="distillation_config", known_elsewhere=elsewhere)
    if problems:
        return None, problems
    if family_cls is not None:
        warnings += list(method_cls.config_warnings(values, family_cls, dict(host or {})))
    return MethodSelection(name, method_cls, values, warnings), []
