"""Registers ODE initialisation — exactly as a third-party method plugin would."""

from ...hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from .method import ODEInit

    register(ODEInit)
