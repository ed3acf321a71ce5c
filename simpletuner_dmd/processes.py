"""What several processes of one run agree on: a value the main process decided, handed to every process. The
reference host, the SimpleTuner bridge and the teacher-pair cache each need it (a resume folder, a checkpoint's
temporary folder, the run's seed, a cache's spec and action)."""

from __future__ import annotations

from typing import Any


def from_main(accelerator: Any, value: Any) -> Any:
    """``value`` as the main process has it, on every process (``value`` itself under one process or without an
    accelerator). Every process must call it: it is a collective."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


__all__ = ["from_main"]
