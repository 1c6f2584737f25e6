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


def check_data_shape(shape) -> tuple:
    """The shape of one example as a tuple of positive ints (JSON gives lists), or ValueError."""
    if (
        not isinstance(shape, (tuple, list))
        or not shape
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ValueError(f"data_shape must be a non-empty tuple of positive ints, got {shape!r}")
    return tuple(shape)
