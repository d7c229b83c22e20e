"""Files adatoken writes: atomically, and JSON artifacts with a format tag and errors that name the file.

A kill or a crash never leaves half a file behind: everything is written to a sibling temporary file
and renamed into place (`os.replace` is atomic on POSIX), so a reader sees the old file or the new one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

T = TypeVar("T", bound="JsonArtifact")


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write a sibling temporary file, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)  # keeps the suffix: savefig picks the format by it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def read_json(path: str | Path, what: str):
    """The parsed JSON of `path`; FileNotFoundError or ValueError naming the file and `what` it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected {what}") from None


class JsonArtifact:
    """A result saved as one JSON object tagged {"format": FORMAT, ...}.

    Subclasses set FORMAT and KIND (what it is, for messages) and write `to_dict` (without the tag)
    and `from_dict`, which may raise KeyError, TypeError or ValueError on a malformed object: `load`
    turns each into a ValueError naming the file and what was expected.
    """

    FORMAT: ClassVar[str]
    KIND: ClassVar[str]

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"format": self.FORMAT, **self.to_dict()}

    def save(self, path: str | Path, indent: int = 2) -> Path:
        return write_json_atomic(path, self.to_json(), indent)

    @classmethod
    def check_format(cls, data, source: str = "data") -> dict:
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{source}: not a {cls.KIND}: expected a JSON object with format {cls.FORMAT!r}, "
                             f"found {found!r}")
        return {k: v for k, v in data.items() if k != "format"}

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        data = cls.check_format(read_json(path, f"a {cls.KIND} ({cls.FORMAT})"), str(path))
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{path}: not a valid {cls.KIND} ({detail})") from None
