"""The entry point ``guidance_distill = "guidance_distill.plugin"``: hands the method class to ``register``.

Importing this module stays cheap (torch loads with the method, only when the plugin manager asks)."""

from simpletuner_dmd import hookimpl


@hookimpl
def register_methods(register):
    from .method import GuidanceDistill

    register(GuidanceDistill)
