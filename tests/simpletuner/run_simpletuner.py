"""The integration test's entry point inside the SimpleTuner venv: apply the test-only CPU shims, then run SimpleTuner's
trainer — through the bridge's launcher, or (``--plain``) SimpleTuner's ``train`` module untouched.

    <venv>/bin/python tests/simpletuner/run_simpletuner.py [--plain] --config CONFIG.json
    <venv>/bin/python tests/simpletuner/run_simpletuner.py --make-tiny-wan FOLDER
    <venv>/bin/python tests/simpletuner/run_simpletuner.py --make-tiny FAMILY FOLDER   (the family's make_tiny)
    <venv>/bin/python tests/simpletuner/run_simpletuner.py --make-tiny-st NAME FOLDER   (a tiny SimpleTuner pipeline:
        flux, qwen_image, ltxvideo or wan-i2v; hosts/simpletuner/tiny_models.py)
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_shims  # noqa: E402

cpu_shims.apply()
cpu_shims.stringify_tensorboard_config()
cpu_shims.ltxvideo_text_embed_scheduler()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--make-tiny-wan"]:
        # Saved by this venv's diffusers/transformers, so SimpleTuner's pinned versions load it.
        from simpletuner_dmd.families.wan_tiny import make_tiny_wan

        make_tiny_wan(argv[1])
        return 0
    if argv[:1] == ["--make-tiny"]:
        # Any of the plugin's families (sd3, wan2.2-ti2v, ...), saved by this venv's diffusers/transformers.
        from simpletuner_dmd.plugins import get_family_class, get_plugin_manager

        get_family_class(get_plugin_manager(), argv[1]).make_tiny(argv[2])
        return 0
    if argv[:1] == ["--make-tiny-st"]:
        # A tiny pipeline of one of SimpleTuner's own families, saved by this venv's diffusers/transformers.
        from simpletuner_dmd.hosts.simpletuner.tiny_models import TINY_BUILDERS

        TINY_BUILDERS[argv[1]](argv[2])
        return 0
    if argv[:1] == ["--plain"]:
        config = argv[argv.index("--config") + 1]
        os.environ.update(CONFIG_BACKEND="json", CONFIG_PATH=str(Path(config).resolve()))
        sys.argv = [sys.argv[0]]
        runpy.run_module("simpletuner.train", run_name="__main__", alter_sys=True)
        return 0
    from simpletuner_dmd.hosts.simpletuner.launcher import main as launch

    return launch(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
