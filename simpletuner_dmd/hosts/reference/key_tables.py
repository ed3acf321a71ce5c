"""The key tables of ``docs/config.md``, generated from the schemas so they never drift from the code.

``python -m simpletuner_dmd.docs --write docs/config.md`` replaces the block between the markers below (appending it
when the markers are absent; creating a minimal file when it is absent). ``--check docs/config.md`` exits 1 with one
line when the file's block is not what the schemas produce (a test runs the same check).

Every registered *built-in* method gets its own table (so a new method's keys appear without touching this file), then
the reference host's keys, then the seed keys the host accepts but ignores, then its data backend files. The command
keeps its name (``simpletuner_dmd/docs.py`` runs this module's ``main``); the code lives here, in the reference host,
because the tables document the reference host's config file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ...config import Key, Schema, parse_betas, parse_timestep_list
from ...plugins import get_plugin_manager, registered_methods
from .backends import MEDIA_BACKEND_SCHEMA, TEXT_BACKEND_SCHEMA

BEGIN = "<!-- BEGIN GENERATED KEY TABLES -->"
END = "<!-- END GENERATED KEY TABLES -->"
COMMAND = "python -m simpletuner_dmd.docs --write docs/config.md"

_KIND = {"int": "int", "float": "float", "bool": "bool", "str": "string", "list": "list", "any": "any",
         "dict": "object"}


def _parse_resolution():
    from .host_schema import parse_resolution  # deferred: host_schema imports torch

    return parse_resolution


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _json(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)


def format_default(key: Key) -> str:
    """The default as the user would write it in config.json."""
    if key.required:
        return "required"
    value = key.default
    if value is not None and key.parse is parse_timestep_list:
        return f'`"{",".join(str(int(v)) for v in value)}"`'
    if value is not None and key.parse is _parse_resolution():
        return f'`"{value[0]}x{value[1]}"`'
    return f"`{_json(value)}`"


def format_type(key: Key) -> str:
    if key.parse is parse_timestep_list:
        kind = 'string "t1,t2,…" or list of int'
    elif key.parse is parse_betas:
        kind = "list of 2 floats"
    elif key.parse is _parse_resolution():
        kind = 'string "WxH" or int'
    else:
        kind = _KIND.get(key.kind, key.kind)
    if key.choices is not None:
        kind = " \\| ".join(f"`{_json(c)}`" for c in key.choices)
    if key.nullable:
        kind += " or null"
    return kind


def key_table(schema: Schema, title: str) -> str:
    """A Markdown section: ``title`` as a level-3 heading and one row per key (key | type | default | meaning)."""
    lines = [f"### {title}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key in schema.keys:
        lines.append(f"| `{key.name}` | {format_type(key)} | {format_default(key)} | {_cell(key.help)} |")
    return "\n".join(lines) + "\n"


def readme_tables(pm: Any = None) -> str:
    """Every built-in method's ``distillation_config`` table and the reference host's tables, between the markers.

    Entry-point plugins are not consulted: the docs document this distribution, whatever else is installed.
    """
    # deferred: host_schema imports torch
    from .host_schema import HOST_SCHEMA, SEED_KEYS_NOT_SUPPORTED

    if pm is None:
        pm = get_plugin_manager(entry_points=False)
    sections = [f"{BEGIN}\n<!-- generated from the schemas by `{COMMAND}`; do not edit by hand -->\n"]
    for name, entry in registered_methods(pm).items():
        table = key_table(entry.cls.schema, f"`distillation_config` of `distillation_method: {name}`")
        summary = getattr(entry.cls, "summary", "")
        if summary:
            head, rest = table.split("\n", 1)
            table = f"{head}\n\n{_cell(summary)}\n{rest}"
        sections.append(table)
    sections.append(key_table(HOST_SCHEMA, "Host keys (the reference host, `simpletuner-dmd train`)"))
    rows = ["### Seed keys the reference host accepts and ignores (one warning each)", "",
            "| key | why |", "| --- | --- |"]
    rows += [f"| `{name}` | {_cell(why)} |" for name, why in sorted(SEED_KEYS_NOT_SUPPORTED.items())]
    if not SEED_KEYS_NOT_SUPPORTED:
        rows.append("| (none) | every key of the seed config is in effect |")
    sections.append("\n".join(rows) + "\n")
    sections.append(key_table(MEDIA_BACKEND_SCHEMA, "Data backend file: an image or video backend"))
    sections.append(key_table(TEXT_BACKEND_SCHEMA, "Data backend file: the `text_embeds` backend"))
    sections.append(END + "\n")
    return "\n".join(sections)


def replace_block(text: str, block: str) -> str:
    """``text`` with the marked block replaced by ``block`` (appended at the end when there are no markers)."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin == -1 and end == -1:
        return text.rstrip("\n") + "\n\n" + block
    if begin == -1 or end == -1 or end < begin or text.count(BEGIN) > 1 or text.count(END) > 1:
        raise ValueError(f"the markers {BEGIN} and {END} must appear once each, in that order")
    return text[:begin] + block.rstrip("\n") + text[end + len(END):]


def check_readme(path: str | Path, block: str | None = None) -> str | None:
    """None when the file's generated block is current, else a one-line problem."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: not found; run `{COMMAND}`"
    text = path.read_text(encoding="utf-8")
    block = readme_tables() if block is None else block
    try:
        current = replace_block(text, block) == text
    except ValueError as exc:
        return f"{path}: {exc}"
    if not current:
        return f"{path}: the generated key tables are out of date; run `{COMMAND}`"
    return None


def write_readme(path: str | Path, block: str | None = None) -> bool:
    """Write the current block into the file (creating a minimal one); True when the file changed."""
    path = Path(path)
    block = readme_tables() if block is None else block
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    new = replace_block(old, block) if old is not None else "# simpletuner-dmd\n\n" + block
    if new == old:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simpletuner_dmd.docs", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, metavar="FILE",
                       help="replace the generated block in FILE (docs/config.md)")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 when FILE's generated block is stale")
    args = parser.parse_args(argv)
    if args.check is not None:
        problem = check_readme(args.check)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        print(f"ok: {args.check} is current")
        return 0
    try:
        changed = write_readme(args.write)
    except ValueError as exc:
        print(f"error: {args.write}: {exc}", file=sys.stderr)
        return 1
    print(f"{'updated' if changed else 'unchanged'}: {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
