"""``MethodBase``: the class a distillation method derives from. It declares every *optional* member a host reads of
a method class, with the default a method that does not set it gets; the required members (``name``, ``summary``,
``schema``, ``__init__(config)``) are the ``Method`` Protocol in ``types.py``, and the step-loop hooks are the
hookspecs (``hookspecs.py``), implemented with ``@hookimpl``. Hosts read these members as plain attributes, so a
method class derives from ``MethodBase`` (a registered class that does not — a plugin written before it — gets the
defaults it lacks set on it by ``plugins.registered_methods``); ``tests/test_bases.py`` checks that nothing reads a
member declared nowhere. Kept free of heavy imports: ``import simpletuner_dmd`` loads this.
"""

from __future__ import annotations

from typing import Any


class MethodBase:
    """Optional members of a method class, each with its default, who reads it and when. All are read on the class
    (before any instance exists), so the callables are static methods."""

    progress_metrics: tuple[str, ...] = ()
    """The log names (of ``StepLoss.logs``) the reference host's progress bar shows (DMD: ``dmd_loss``,
    ``fake_score_loss``); the trainer reads it at start-up. Empty: the loss only."""

    @staticmethod
    def config_warnings(config: dict[str, Any], family_cls: type, host: dict[str, Any]) -> list[str]:
        """One warning per key of the validated ``config`` that does not apply with ``family_cls`` or the ``host``
        config (DMD's block keys on a bidirectional family). ``config.validate_method_config`` calls it when a host
        validates its config with a family; hosts show the warnings at start-up. Default: none."""
        return []

    @staticmethod
    def usage_notes(config: dict[str, Any]) -> list[str]:
        """What a user of the exported student must know beyond its schedule, one paragraph each; the reference
        host's model card (``hosts/reference/export.py``) shows them under the student's schedule. Default: none."""
        return []

    @staticmethod
    def memory_plan(config: dict[str, Any], host: dict[str, Any], layout: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        """What ``simpletuner-dmd estimate`` needs to know of a run of this method: ``second_network``
        (``{"kind": "lora" | "full", "rank": r}`` or None) and ``passes_per_step`` (network passes per optimizer
        step by role, averaged), and optionally ``student_graphs`` (the forward graphs the student's backward holds
        at once: default 1), ``kv_cache_share`` and ``one_time_passes`` (passes by role paid once before the first step,
        e.g. the teacher's ODE pairs: ``estimate`` prints them beside the per-step ones). ``layout`` is ``{"causal": bool, "latent_frames": F}`` for the
        sample being estimated (``estimate.layout_for``). Default ``{}``: the estimate counts a plain LoRA run."""
        return {}

    @staticmethod
    def context_parallel_problems(config: dict[str, Any]) -> list[str]:
        """What of ``config`` cannot run with one sample's tokens split over processes (the reference host's
        ``context_parallel_size`` > 1: between the network's input and output each process holds a share of the
        tokens, so a module reading a block's features sees that share only), one line each; the reference host's
        ``run_config`` reports them before anything loads. Default: none."""
        return []

    @staticmethod
    def streaming(config: dict[str, Any]) -> dict[str, Any] | None:
        """How a block-causal student of this config must be run (``fewstep_sampling.streaming_settings``: the
        timesteps per block, frames per block, context noise, KV cache window). The reference host's export asks
        it for a causal family only, writes it into the student's info file (``sample`` streams the student by it)
        and into the model card. Default ``None``: the method has no streaming settings."""
        return None


__all__ = ["MethodBase"]
