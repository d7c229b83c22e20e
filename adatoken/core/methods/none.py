"""`none`: the unpruned model, run through the same runtime (the reference for every comparison)."""
from dataclasses import dataclass

from adatoken.core.methods import Method, register
from adatoken.core.schedule import Schedule


@register
class NoPruning(Method):
    name = "none"
    role = "reference"
    style = ("black", "*")  # colour and marker in every figure

    @dataclass
    class Config:
        pass

    def schedule(self, num_layers: int) -> Schedule:
        return Schedule([1.0] * num_layers, {"method": "none"})
