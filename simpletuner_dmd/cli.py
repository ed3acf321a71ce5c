"""``simpletuner-dmd``: train, sample, estimate, validate-config, plugins, simpletuner-train, make-example, make-tiny.

A user error (``UserError``) prints ``error: …`` lines and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import suggest
from .errors import ConfigError, UserError, print_user_error
from .plugins import get_plugin_manager, registered_families, registered_methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simpletuner-dmd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the reference host trainer on a SimpleTuner config.json")
    p.add_argument("--config", required=True, type=Path)

    p = sub.add_parser("sample", help="sample a student output folder through the stock diffusers pipeline (a block-causal "
                       "student: streamed block by block)")
    p.add_argument("--base", required=True, help="the base pipeline folder (or a hub id)")
    p.add_argument("--student", required=True, type=Path, help="the student output folder (output_dir)")
    p.add_argument("--out", required=True, type=Path, help="where the samples go")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-library", type=Path, help="a JSON file {name: prompt} (SimpleTuner's format)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--negative-prompt", default=None, help="the teacher's negative prompt (default: training's)")
    p.add_argument("--teacher-steps", type=int, default=0, help="also sample the base at N steps (0: no)")
    p.add_argument("--teacher-guidance", type=float, default=5.0)
    p.add_argument("--ema", action="store_true", help="sample the EMA weights (ema/)")
    p.add_argument("--device", default=None)

    p = sub.add_parser("estimate", help="predict a config's peak GPU memory and passes per step (loads no weights)")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--gpu-memory", type=float, default=None, help="the card's usable memory in GiB (say whether it fits)")
    p.add_argument("--width", type=int, help="training sample width (default: validation_resolution's)")
    p.add_argument("--height", type=int, help="training sample height (default: validation_resolution's)")
    p.add_argument("--frames", type=int, help="frames per training sample (default: validation_num_video_frames)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the step is spread over (default 1): data parallel, or "
                                                        "with --fsdp and/or --context-parallel")
    p.add_argument("--fsdp", action="store_true", help="shard the frozen base and the adapters over the GPUs (FSDP2)")
    p.add_argument("--context-parallel", type=int, default=1, help="split one sample's tokens over this many GPUs")

    p = sub.add_parser("validate-config", help="validate a config.json (and its distillation_config) only")
    p.add_argument("path", type=Path)
    p.add_argument("--no-check-paths", action="store_true", help="do not require the model and data files to exist")
    p.add_argument("--host", choices=("reference", "simpletuner"), default=None,
                   help="the trainer the config is for: reference (simpletuner-dmd train) or simpletuner (SimpleTuner's "
                        "own trainer, checked against the SimpleTuner installed here when it is); default: simpletuner "
                        "when SimpleTuner is importable, else reference")

    sub.add_parser("plugins", help="list every method and model family and the distribution providing it")

    p = sub.add_parser("simpletuner-train", help="run SimpleTuner's own trainer with this plugin's methods "
                                                  "(SimpleTuner installed; see docs/simpletuner.md)")
    p.add_argument("--config", type=Path, default=None, help="SimpleTuner's config.json (default: its own lookup)")

    p = sub.add_parser("make-example", help="build (once) the embedded example: the digits, a tiny Wan teacher trained "
                                            "to draw them, and the digits FD's feature space")
    p.add_argument("workdir", type=Path, nargs="?", default=Path("work"))

    p = sub.add_parser("make-tiny", help="build a tiny random-weight pipeline of a model family, offline, to try the "
                                         "family on a CPU (e.g. make-tiny wan2.2 work/tiny-wan22)")
    p.add_argument("family", help="a family name (simpletuner-dmd plugins lists them)")
    p.add_argument("path", type=Path, help="the folder to write (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", type=Path, help="also write a tiny captioned dataset to this new folder (coloured "
                                                 "digits, 64x64: 6 PNGs and 4 nine-frame GIFs), the one "
                                                 "config_examples/tiny-wan-dmd trains on")

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
    if args.command == "sample":
        from .sample import SampleRequest, sample, student_info

        info = student_info(args.student)
        prompts = {f"prompt-{i}": text for i, text in enumerate(args.prompt)}
        if args.prompt_library:
            from .hosts.reference.prompt_library import read_prompt_library

            library, problems, _ = read_prompt_library(str(args.prompt_library), "prompt-library")
            if problems:
                raise ConfigError(problems)
            prompts.update(library)
        if not prompts and info.get("validation_prompt"):
            prompts = {"validation": info["validation_prompt"]}
        if not prompts:
            raise UserError("sample: give --prompt or --prompt-library (the student folder names no prompt)")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
        negative = args.negative_prompt if args.negative_prompt is not None else info.get("negative_prompt") or ""
        sample(SampleRequest(base=args.base, student=args.student, out=args.out, prompts=prompts, seeds=seeds,
                             width=args.width, height=args.height, frames=args.frames, negative_prompt=negative,
                             teacher_steps=args.teacher_steps, teacher_guidance=args.teacher_guidance, ema=args.ema,
                             device=args.device))
        return 0
    if args.command == "estimate":
        from .estimate import print_estimate
        from .hosts.reference.run_config import load_config

        return print_estimate(args, load_config(args.config, get_plugin_manager(), check_paths=False))
    if args.command == "validate-config" and _validates_for_simpletuner(args.host):
        from .hosts.simpletuner.preflight import validate_for_simpletuner

        return validate_for_simpletuner(args.path)
    if args.command == "validate-config":
        from .hosts.reference.run_config import load_config

        rc = load_config(args.path, get_plugin_manager(), check_paths=not args.no_check_paths)
        for warning in rc.warnings:
            print(f"warning: {warning}")
        if not rc.warnings:
            print("every key of this config is in effect: none is ignored")
        method = rc.method_name or "none"
        print(f"ok: {args.path} (method: {method}, {len(rc.method_config)} method keys; family: {rc.family_cls.name})")
        return 0
    if args.command == "plugins":
        pm = get_plugin_manager()
        listed = (("methods", registered_methods(pm)), ("model families", registered_families(pm)))
        width = max([12, *(len(name) for _, entries in listed for name in entries)])
        for title, entries in listed:
            print(f"{title}:")
            for name, entry in entries.items():
                summary = getattr(entry.cls, "summary", "")
                print(f"  {name:<{width}} {entry.distribution:<24} {summary}")
        return 0
    if args.command == "simpletuner-train":
        from .hosts.simpletuner.launcher import run

        return run(args.config)
    if args.command == "make-example":
        from .hosts.reference.digits_example import make_digits_example

        make_digits_example(args.workdir)
        return 0
    if args.command == "make-tiny":
        families = registered_families(get_plugin_manager())
        if args.family not in families:
            raise UserError(f"make-tiny: unknown family {args.family!r}{suggest(args.family, families)}")
        make = families[args.family].cls.make_tiny
        if make is None:
            raise UserError(f"make-tiny: the {args.family} family does not build a tiny model (no make_tiny)")
        taken = [path for path in (args.path, args.dataset) if path is not None and path.exists()]
        if taken:
            raise ConfigError([f"make-tiny: {path} exists; give a new folder" for path in taken])
        print(f"tiny {args.family} pipeline: {make(args.path, seed=args.seed)}")
        if args.dataset is not None:
            from .hosts.reference.tiny import make_tiny_dataset

            print(f"tiny dataset: {make_tiny_dataset(args.dataset, seed=args.seed)}")
        return 0
    raise AssertionError(args.command)


def _validates_for_simpletuner(host: str | None) -> bool:
    if host is not None:
        return host == "simpletuner"
    from .hosts.simpletuner.preflight import simpletuner_importable

    return simpletuner_importable()


if __name__ == "__main__":
    sys.exit(main())
