"""An example third-party model family for simpletuner-dmd: a 2-D Gaussian mixture with an exact teacher."""

from .mixture import PRESETS, ClosedFormTeacher, FlowMLP, Mixture, load_network, save_network
from .plugin import GMMFamily

__all__ = ["PRESETS", "ClosedFormTeacher", "FlowMLP", "GMMFamily", "Mixture", "load_network", "save_network"]
