"""Settings objects from a profile: a YAML file of sections, then `key=value` overrides, validated.

Run as: part of every command that takes `--profile` and overrides (`llmops run`, `llmops deployer`, ...).

A key users type that was renamed keeps working: a model lists it in RENAMED (old name -> new, at its own level),
and a profile, an override or a direct construction that uses the old name reaches the new field. Giving both
names at once is refused, naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


def renamed_keys(renamed: dict[str, str], data: dict) -> dict:
    """`data` with each old key (`renamed`: old -> new) under its new name; both given: refused, naming them."""
    if not renamed.keys() & data.keys():
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old in data:
            if new in data:
                raise ValueError(f"{old!r} is the old name of {new!r}: give one of them")
            data[new] = data.pop(old)
    return data


class Renamable(BaseModel):
    RENAMED: ClassVar[dict[str, str]] = {}  # an old field name -> its new name, still accepted

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return renamed_keys(cls.RENAMED, data) if isinstance(data, dict) else data


class Profiled(Renamable):
    """A settings object loaded from a profile (`load_settings`): pipelines.config and serving.settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = Field("local", description="the profile this config was loaded from")


def _section(model: type[BaseModel] | None, name: str) -> type[BaseModel] | None:
    field = model.model_fields.get(name) if model else None
    kind = field.annotation if field else None
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def current_key(model: type[BaseModel] | None, key: str) -> str:
    """A dotted key with every renamed part replaced by its current name (`deploy.gpu_count` ->
    `deploy.accelerator_count`)."""
    parts = []
    for part in key.split("."):
        part = getattr(model, "RENAMED", {}).get(part, part)
        parts.append(part)
        model = _section(model, part)
    return ".".join(parts)


def model_at(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The section model a current dotted key names (None past a plain field)."""
    for part in key.split("."):
        model = _section(model, part)
    return model


def current_names(model: type[BaseModel] | None, raw: dict) -> dict:
    """A profile's nested dict with renamed keys under their current names, at every level (both given: refused)."""
    out = renamed_keys(getattr(model, "RENAMED", {}), raw)
    return {
        name: current_names(section, value) if (section := _section(model, name)) and isinstance(value, dict) else value
        for name, value in out.items()
    }


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every field of a settings object, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            rows += describe(kind, f"{prefix}{name}.")
            continue
        shown = getattr(kind, "__name__", None) if isinstance(kind, type) else None
        rows.append(
            (f"{prefix}{name}", shown or str(kind).replace("typing.", ""), repr(field.default), field.description or "")
        )
    return rows


def apply_overrides(raw: dict, overrides: list[str], model: type[BaseModel] | None = None) -> dict:
    """`section.key=value` items into a nested dict; values parse the way YAML would (numbers, booleans, lists).
    Given the settings `model`, old key names in `raw` and in the overrides become their current ones first."""
    raw = current_names(model, raw) if model else raw
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.max_steps=10)")
        node = raw
        *parents, leaf = current_key(model, key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value) if value != "" else ""
    return raw


def load_settings(model: type[BaseModel], profile: str, directory: Path, overrides: list[str] | None = None):
    """A profile by name (DIRECTORY/NAME.yaml) or by path, plus `key=value` overrides, validated as `model`."""
    path = Path(profile)
    if not path.suffix:
        path = directory / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise FileNotFoundError(f"config profile {profile!r} not found (known profiles: {', '.join(known)})")
    raw: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("profile", path.stem)
    return model.model_validate(apply_overrides(raw, overrides or [], model))
