"""Benchmark variants written as `NAME=VALUE,NAME=VALUE`: parsed and checked against the names a script knows
before anything is built or started, so a typo costs a second, not a GPU run."""

from __future__ import annotations

import json
from typing import Any

INDUCTOR = "inductor."  # `inductor.NAME=VALUE`: any inductor option, passed to the variant's torch.compile


class VariantError(ValueError):
    pass


def _convert(key: str, kind: str, raw: str) -> Any:
    try:
        if kind in ("bool", "bool_or_auto"):
            if kind == "bool_or_auto" and raw.lower() == "auto":
                return None
            if raw.lower() not in ("0", "1", "true", "false", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "on")
        if kind == "int":
            return int(raw)
        if kind == "int_or_auto":
            return None if raw == "auto" else int(raw)
        return raw
    except ValueError:
        raise VariantError(f"{key}={raw!r}: expected {kind.replace('_', ' ')}") from None


def parse_settings(text: str, known: dict[str, str]) -> dict[str, Any]:
    """`known` maps each setting to its kind: bool, bool_or_auto, int, int_or_auto or str. Inductor options are
    always allowed; their values are JSON where they parse (numbers, true/false, lists), else strings."""
    settings: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.strip().partition("=")
        if not sep or not key or not raw:
            raise VariantError(f"{item!r} in variant {text!r}: expected NAME=VALUE")
        if key in known:
            settings[key] = _convert(key, known[key], raw)
        elif key.startswith(INDUCTOR) and len(key) > len(INDUCTOR):
            try:
                settings[key] = json.loads(raw)
            except json.JSONDecodeError:
                settings[key] = raw
        else:
            names = ", ".join([*known, INDUCTOR + "NAME"])
            raise VariantError(f"unknown setting {key!r} in variant {text!r}; known: {names}")
    return settings


def inductor_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The `inductor.` settings as torch.compile options, checked against this torch's inductor. A 0/1 given for a
    boolean option becomes False/True: torch.compile rejects an int there (`enable_pdl=1` failed on the H200)."""
    from torch._inductor import config

    known = config.get_config_copy()
    options = {}
    for key, value in settings.items():
        if not key.startswith(INDUCTOR):
            continue
        name = key[len(INDUCTOR) :]
        if name not in known:
            raise VariantError(f"this torch's inductor has no option {name!r}")
        if config.get_type(name) is bool and not isinstance(value, bool):
            if value not in (0, 1):
                raise VariantError(f"{key}={value!r}: expected a boolean (0/1, true/false)")
            value = bool(value)
        options[name] = value
    return options
