"""Config files for the service and the batch job: strict models, YAML and env layers, errors.

A config is read the same way everywhere: a YAML mapping, with overrides on top of it
(flags, builder args, ``PREFIX_A__B=value`` variables) merged key by key, validated by a
``Strict`` model whose unknown keys are errors. Errors name the key and the problem and
never echo the value: a config may hold secrets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from raytseg.errors import InvalidOptionError

Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (empty file: ``{}``); ``what`` names it in errors."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidOptionError(f"Cannot read the {what} {path}: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InvalidOptionError(f"The {what} {path} must be a YAML mapping of options.")
    return loaded


def merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; nested sections (``model: {...}``) merge key by key."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            value = merged(below, value)
        out[key] = value
    return out


def env_overrides(environ: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """``<prefix>A__B=value`` variables as the nested mapping ``{a: {b: value}}`` (values YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(prefix):
            continue
        keys = name[len(prefix) :].lower().split("__")
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw) if raw else ""
    return out


def validated(model: type[Model], data: Mapping[str, Any], what: str) -> Model:
    """``model`` from ``data``; ``InvalidOptionError("Invalid <what>: key: problem; ...")`` if not."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidOptionError(f"Invalid {what}: {problems(exc)}") from None


def problems(exc: ValidationError) -> str:
    """Each problem as ``key.path: message``, without the input values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "config"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
