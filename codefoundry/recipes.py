"""Resolving a run's config: preset -> YAML recipe -> ``section.field=value`` overrides.

Every command that builds a run (pretrain, resume, SFT, DPO, speedrun, the smoke test)
resolves its settings here, so they all read values the same way:

* YAML is read with YAML 1.2 booleans: only ``true``/``false`` are booleans, so
  ``train.compile=on`` stays the string "on" that the field expects;
* every key is checked against the dataclasses (unknown keys are an error, never ignored);
* a resumed run starts from its saved config and applies the same overrides on top.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from codefoundry.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    update_dataclass,
)
from codefoundry.presets import get_preset

RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = ("extends", "preset", "model", "train", "data")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's core schema for scalars: booleans are only true/false (not
    on/off/yes/no) and numbers have no base-60 forms (``8:1`` stays a string, not 481)."""


_YAML12_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML12_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``section.field=value`` strings (value read as YAML 1.2) into nested dicts."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' must look like section.field=value, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = load_yaml(raw) if raw else ""
    return out


def find_recipe(recipe: str | Path) -> Path:
    """A recipe path, or the name of one in ``configs/`` (``nanocode`` -> configs/nanocode.yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPE_DIR / f"{recipe}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []
    raise ConfigError(f"recipe {recipe} not found; give a YAML path or one of: {', '.join(known) or '(none)'}")


def read_recipe(recipe: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The sections of a YAML recipe (unknown sections are an error).

    ``extends: NAME`` starts from another recipe (e.g. cf-1b extends cf-150m and changes only
    the preset): its sections are merged key by key, this recipe's values winning.
    """
    path = find_recipe(recipe)
    data = load_yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping with preset/model/train/data keys")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path} extends itself (through {parent})")
    sibling = path.parent / f"{parent}.yaml"  # a recipe's own folder first, then configs/
    merged = read_recipe(sibling if sibling.is_file() else parent, (*_seen, path.resolve()))
    for key, value in data.items():
        merged[key] = {**(merged.get(key) or {}), **value} if isinstance(value, dict) else value
    return merged


def build_run_config(preset: str | None = None, recipe: str | Path | None = None,
                     overrides: list[str] | None = None, base: dict[str, Any] | None = None) -> RunConfig:
    """Resolve ``base`` (a saved run config, on resume) -> preset -> recipe -> overrides into one RunConfig.

    The preset comes from ``preset``, else the last layer naming one, else ``base``'s, else the default.
    With ``base`` the preset's model is not re-read: the saved model config is the starting point.
    """
    layers: list[dict[str, Any]] = []
    if recipe:
        layers.append(read_recipe(recipe))
    layers.append(parse_overrides(overrides or []))
    for layer in layers:
        unknown = set(layer) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; use {', '.join(SECTIONS)}")

    preset_name = preset
    for layer in layers:
        preset_name = preset_name or layer.get("preset")
    if base is not None:
        preset_name = preset_name or base.get("preset", "")
        model = update_dataclass(ModelConfig(), base["model"], "model.")
        train = update_dataclass(TrainConfig(), base["train"], "train.")
        data = update_dataclass(DataConfig(), base.get("data") or {}, "data.")
    else:
        preset_name = preset_name or RunConfig.preset
        model, train, data = get_preset(preset_name), TrainConfig(), DataConfig()
    for layer in layers:
        model = update_dataclass(model, layer.get("model") or {}, "model.")
        train = update_dataclass(train, layer.get("train") or {}, "train.")
        data = update_dataclass(data, layer.get("data") or {}, "data.")
    return RunConfig(preset=preset_name, model=model, train=train, data=data)
