"""What every model config dataclass shares: a JSON-safe dict and back, naming unknown keys."""
from __future__ import annotations

from dataclasses import asdict, fields


class ConfigDict:
    """Mixin for a config dataclass: `to_dict()` (tuples as lists) and `from_dict(d)`."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)
