"""Exponential moving average of the student's trainable (LoRA) weights.

The average is kept in float32 even when the weights are bf16/fp16: with a decay like 0.999 each
update moves the average by 0.1% of the difference, which a 16-bit mantissa mostly rounds away.
There is no decay warm-up (unlike diffusers' EMAModel): the decay is the configured value from the
first update on.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from simpletuner_dmd.errors import UserError


class EMA:
    def __init__(self, named_params: dict[str, Tensor], decay: float, update_interval: int = 1):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        if update_interval < 1:
            raise ValueError(f"EMA update_interval must be >= 1, got {update_interval}")
        self.params = dict(named_params)
        self.decay = float(decay)
        self.update_interval = int(update_interval)
        self.num_updates = 0
        self.last_step: int | None = None
        self.shadow = {name: _averaging_copy(param) for name, param in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Fold the live weights into the average if `step` (optimizer steps done) is due.

        Returns whether it updated. Calling twice with the same step (e.g. once per
        gradient-accumulation micro-step) updates once.
        """
        if step % self.update_interval != 0 or step == self.last_step:
            return False
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().to(self.shadow[name].dtype), 1.0 - self.decay)
        self.num_updates += 1
        self.last_step = step
        return True

    def state_dict(self) -> dict:
        # decay and update_interval are saved for the record; on load the configured values win,
        # so a user can change them when resuming.
        return {
            "decay": self.decay,
            "update_interval": self.update_interval,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "shadow": {name: tensor.detach().clone() for name, tensor in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        _check_names("EMA checkpoint", shadow, self.shadow, UserError)
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise UserError(
                    f"EMA checkpoint weight {name} has shape {tuple(tensor.shape)}, the model has "
                    f"{tuple(self.shadow[name].shape)}; was the LoRA config changed?"
                )
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])
        self.last_step = state["last_step"]

    @contextmanager
    def swap_into(self, named_params: dict[str, Tensor] | None = None) -> Iterator[None]:
        """Put the EMA weights into the live params for the body (validation, export), then restore.

        The live values are restored even when the body raises.
        """
        params = self.params if named_params is None else named_params
        _check_names("swap_into", params, self.shadow)
        with torch.no_grad():
            backup = {name: param.detach().clone() for name, param in params.items()}
            for name, param in params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(backup[name])

    @torch.no_grad()
    def copy_to(self, target: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The EMA weights as a dict of tensors.

        With `target`, they are copied in place into its tensors (cast to their dtype) and `target`
        is returned; without, a new dict of copies in the live params' dtype and device.
        """
        if target is None:
            return {
                name: self.shadow[name].to(dtype=param.dtype, device=param.device, copy=True)
                for name, param in self.params.items()
            }
        _check_names("copy_to", target, self.shadow)
        for name, tensor in target.items():
            tensor.copy_(self.shadow[name])
        return target


def _averaging_copy(param: Tensor) -> Tensor:
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    return param.detach().to(dtype=dtype, copy=True)


def _check_names(what: str, given: dict, expected: dict, error: type[Exception] = ValueError) -> None:
    """A checkpoint that does not match is the user's (changed config); a wrong dict passed in code is a bug."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise error(
            f"{what}: weight names do not match the EMA's (missing: {missing[:3]}, unexpected: {extra[:3]}); "
            "was the LoRA config changed?"
        )
