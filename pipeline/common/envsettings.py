"""Settings read from environment variables: integer fields of a frozen dataclass, each naming its variable."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

SWITCHES = {"on": "1", "true": "1", "yes": "1", "off": "0", "false": "0", "no": "0"}  # a flag's words


def env_field(name: str, default: int, doc: str) -> Any:
    """A dataclass field read from the variable ``name`` (an integer; 0/1 or on/off for a bool default)."""
    return dataclasses.field(default=default, metadata={"env": name, "doc": doc})


def read_env(cls: type, env: Mapping[str, str] | None = None, minimums: Mapping[str, int] | None = None,
             special: frozenset[int] = frozenset(), error: type[Exception] = ValueError) -> dict[str, Any]:
    """Field name → value for each :func:`env_field` of ``cls``: the variable's integer, else the default.

    Args:
        env: the variables (default ``os.environ``).
        minimums: the smallest value a field accepts (default 1).
        special: values accepted whatever the minimum (e.g. a marker for "derive it").
        error: the exception raised for a value that is not an integer or is too small; its
            message names the variable and the value.
    """
    env = os.environ if env is None else env
    minimums = minimums or {}
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        name, text = spec.metadata["env"], env.get(spec.metadata["env"], "").strip()
        if isinstance(spec.default, bool) and text.lower() in SWITCHES:
            text = SWITCHES[text.lower()]
        try:
            value = int(text) if text else spec.default
        except ValueError:
            raise error(f"{name}={text!r}: expected an integer") from None
        if isinstance(spec.default, bool):
            value = bool(value)
        elif value not in special and value < minimums.get(spec.name, 1):
            raise error(f"{name}={value}: must be >= {minimums.get(spec.name, 1)}")
        values[spec.name] = value
    return values


def describe(settings: Any) -> list[str]:
    """One line per field: variable, value, meaning."""
    return [f"{f.metadata['env']:30} {getattr(settings, f.name)!s:>10}  {f.metadata['doc']}"
            for f in dataclasses.fields(settings)]
