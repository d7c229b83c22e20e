"""The demo: AdaToken-3D end to end on the shipped testbed, written up as a report folder (see `stages`)."""
from adatoken.apps.demo.stages import DemoOptions, run_demo

__all__ = ["DemoOptions", "run_demo"]
