"""What the world outside the run hears of it: ``webhook_config`` messages and hub uploads (``push_to_hub``,
``push_checkpoints_to_hub``, ``hub_model_id``), from the main process only.

Neither may stop training: a webhook that fails is one warning (``webhooks.py``); a checkpoint upload runs in the
background and a failed one is one warning, retried with the next checkpoint (``hub.py``). Only the final upload can
fail the run — after everything is saved locally, as one line and a non-zero exit. The hub is whatever
``HF_ENDPOINT`` names (huggingface.co by default) with the token ``huggingface_hub`` finds (``HF_TOKEN`` or a stored
login); no token is ever logged or written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .webhooks import Webhooks, load_webhook_config


class Notifier:
    """The run's one channel to the world outside: the trainer calls ``started``, ``checkpoint``, ``validated``,
    ``finished`` and ``failed`` and never asks whether webhooks or the hub are configured; each does nothing unless
    its keys are set (``docs/reference-host.md`` says why they live beside the trainer)."""

    def __init__(self, host: dict, *, log: Callable[[str], None] = print):
        self.host, self.log = host, log
        self.main = True  # the host sets it from its accelerator: only the main process sends
        self.webhooks = None
        self.hub = None
        if host.get("webhook_config"):
            targets = load_webhook_config(host["webhook_config"])  # checked already when the config was validated
            self.webhooks = Webhooks(targets, project_name=f"{host['tracker_project_name']} "
                                                           f"{host['tracker_run_name']}", log=log)
        if host.get("push_to_hub") or host.get("push_checkpoints_to_hub"):
            # huggingface_hub is slow to import, and needed only when pushing
            from .hub import HubPusher

            self.hub = HubPusher(host["hub_model_id"], endpoint=os.environ.get("HF_ENDPOINT") or None, log=log)

    def _send(self, event: str, message: str, **kwargs: Any) -> None:
        if self.webhooks is not None and self.main:
            self.webhooks.send(event, message, **kwargs)

    def started(self, message: str, *, step: int) -> None:
        self._send("start", message, step=step)

    def checkpoint(self, folder: Path, step: int) -> None:
        self._send("checkpoint", f"checkpoint saved: {folder.name}", step=step, path=str(folder))
        if self.hub is not None and self.main and self.host.get("push_checkpoints_to_hub"):
            self.hub.push_checkpoint(folder, step)

    def validated(self, folder: Path, step: int) -> None:
        """The round's samples: each prompt's and variant's GIF (a video) or first frame (an image)."""
        images = []
        for variant in sorted(p for p in folder.glob("*/*") if p.is_dir()):
            gif, png = variant / "sample.gif", variant / "frame-000.png"
            images.append(gif if gif.is_file() else png)
        names = ", ".join(f"{p.parent.parent.name}/{p.parent.name}" for p in images)
        self._send("validation", f"validation at step {step}: {names}", step=step, images=images)

    def finished(self, out: Path, step: int) -> None:
        if self.hub is not None and self.main:
            self.hub.close()  # the checkpoint uploads still running finish first
            if self.host.get("push_to_hub"):
                self.hub.push_final(out, commit_message=f"simpletuner-dmd: the student after {step} steps")
                self.log(f"pushed {out} to the hub as {self.host['hub_model_id']}")
        self._send("finish", f"training finished after {step} steps; the student is in {out}", step=step)

    def failed(self, exc: BaseException) -> None:
        text = str(exc).splitlines()[0] if str(exc) else ""
        self._send("error", f"training stopped: {type(exc).__name__}" + (f": {text}" if text else ""))

    def close(self) -> None:
        if self.hub is not None:
            left = self.hub.close()
            if left:
                self.log(f"warning: checkpoints never uploaded to the hub: {', '.join(map(str, left))}")
        if self.webhooks is not None:
            self.webhooks.close()


__all__ = ["Notifier"]
