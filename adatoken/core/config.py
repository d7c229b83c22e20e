"""`PruneConfig`: a method name plus that method's validated parameters, with a JSON round trip."""
from __future__ import annotations

import dataclasses

from adatoken.core.artifacts import JsonArtifact
from adatoken.core.methods import METHODS, make_config
from adatoken.core.schedule import Schedule


class PruneConfig(JsonArtifact):
    """`PruneConfig(method="adatoken3d", retention=0.4)`; unknown names or values raise ValueError."""

    FORMAT = "adatoken.prune_config/v1"
    KIND = "prune config"

    def __init__(self, method: str = "none", **params):
        self.method = method
        self.params = make_config(method, params)

    def build(self):
        """The method object this config describes."""
        return METHODS[self.method](self.params)

    def to_dict(self) -> dict:
        params = {}
        for field in dataclasses.fields(self.params):
            value = getattr(self.params, field.name)
            params[field.name] = value.to_json() if isinstance(value, Schedule) else \
                list(value) if isinstance(value, tuple) else value
        return {"method": self.method, **params}

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        data = {k: v for k, v in data.items() if k != "format"}
        method = data.pop("method", None)
        if method is None:
            raise ValueError("a prune config needs a 'method' key")
        if isinstance(data.get("schedule"), dict):
            data["schedule"] = Schedule.from_dict(data["schedule"])
        return cls(method, **data)

    def __eq__(self, other) -> bool:
        return isinstance(other, PruneConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "method" and v is not None)
        return f"PruneConfig(method={self.method!r}{', ' + params if params else ''})"
