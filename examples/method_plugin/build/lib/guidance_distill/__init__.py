"""An example third-party distillation method for simpletuner-dmd (see README.md)."""

from .method import GuidanceDistill

__all__ = ["GuidanceDistill"]
