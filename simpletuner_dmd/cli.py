"""``simpletuner-dmd``: train, validate-config, plugins, simpletuner-train, make-example.

A user error (``UserError``) prints ``error: …`` lines and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError, print_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simpletuner-dmd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the reference host trainer on a SimpleTuner config.json")
    p.add_argument("--config", required=True, type=Path)

    p = sub.add_parser("validate-config", help="validate a config.json (and its distillation_config) only")
    p.add_argument("path", type=Path)
    p.add_argument("--no-check-paths", action="store_true", help="do not require the model and data files to exist")

    sub.add_parser("plugins", help="list every method and model family and the distribution providing it")

    p = sub.add_parser("simpletuner-train", help="run SimpleTuner's own trainer with this plugin's methods "
                                                  "(SimpleTuner installed; see docs/simpletuner.md)")
    p.add_argument("--config", type=Path, default=None, help="SimpleTuner's config.json (default: its own lookup)")

    p = sub.add_parser("make-example", help="build the tiny local Wan model and dataset of the embedded example")
    p.add_argument("workdir", type=Path, nargs="?", default=Path("work"))

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UserError as exc:
        print_user_error(exc)
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .hosts.reference.trainer import train

        train(args.config)
        return 0
    if args.command == "validate-config":
        from .hosts.reference.run_config import load_config
        from .plugins import get_plugin_manager

        rc = load_config(args.path, get_plugin_manager(), check_paths=not args.no_check_paths)
        for warning in rc.warnings:
            print(f"warning: {warning}")
        if not rc.warnings:
            print("every key of this config is in effect: none is ignored")
        method = rc.method_name or "none"
        print(f"ok: {args.path} (method: {method}, {len(rc.method_config)} method keys; family: {rc.family_cls.name})")
        return 0
    if args.command == "plugins":
        from .plugins import get_plugin_manager, registered_families, registered_methods

        pm = get_plugin_manager()
        for title, entries in (("methods", registered_methods(pm)), ("model families", registered_families(pm))):
            print(f"{title}:")
            for name, entry in entries.items():
                summary = getattr(entry.cls, "summary", "")
                print(f"  {name:<12} {entry.distribution:<24} {summary}")
        return 0
    if args.command == "simpletuner-train":
        from .hosts.simpletuner.launcher import run

        return run(args.config)
    if args.command == "make-example":
        from .hosts.reference.tiny import make_example

        make_example(args.workdir)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
