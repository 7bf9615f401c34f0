"""One config loader for every stage and pipeline: YAML file < preset < environment < flags < `--set a.b=value`.

A stage's settings are one typed dataclass tree whose defaults are defined once, in the dataclasses; a YAML
file in `configs/` holds only what differs from them. `load` stacks five layers, later ones winning:

1. the YAML file (`--config PATH`; `--config ''`: none, the dataclass defaults);
2. a preset (`--preset NAME`: `configs/presets/NAME.yaml` or a path). Its top-level `model` and
   `model_kwargs` apply to every stage whose config has that field; its section named after the stage
   (`preprocess`, `align`, `rollout`, `fit_probe`, `train`, `calibrate_blind`, `evaluate`, `attack`, `robustness`,
   `serve`, `demo`) to that stage only;
3. the environment: `SR_RAY_<SECTION>__<FIELD>[__<SUBFIELD>]=value` for the stage's section
   (`SR_RAY_TRAIN__LR=2e-4`, `SR_RAY_SERVE__LIMITS__MAX_TOKENS=512`): one cluster's settings (a job's
   `runtime_env`, a container) without editing files;
4. the stage's flags, each sugar for one field (`sr-ray evaluate --limit 40` is `--set limit=40`);
5. `--set a.b=value`, repeatable: a dotted field path; the value is read as YAML (`2e-4`, `[a, b]`, `null`).

Mappings merge key by key (a section sets only the keys it names), then `sr_ray.config_types.build`
checks every value against its field's type. A mistake (unknown key, wrong type, missing file) is a
`ConfigError` naming it, which the CLI reports as a usage error (exit 2) before Ray, MLflow or a model starts.

Relative config and preset paths are looked up in the working directory, then in the source checkout
this package runs from (scripts/install.sh installs it editable); the YAML files are not package data.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import yaml

from sr_ray.config_types import ConfigError, build

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET_SHARED = ("model", "model_kwargs")
STAGE_SECTIONS = ("preprocess", "align", "rollout", "fit_probe", "train", "calibrate_blind", "evaluate", "attack",
                  "robustness", "serve", "demo")
_FLAG = "config:"  # argparse dest prefix of the flags that set a config field (the rest is the field path)


def config_file(path: str | Path) -> Path:
    """A config path as given, or, when it is relative and missing here, the source checkout's file of that
    name: the default `configs/<stage>.yaml` works from any directory."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def resolve_preset(name: str) -> Path:
    """A preset path, or a name under configs/presets/ (working directory first, then the checkout)."""
    path = config_file(name) if name.endswith((".yaml", ".yml")) else config_file(f"configs/presets/{name}.yaml")
    if not path.is_file():
        raise ConfigError(f"preset {name!r}: no such file, nor configs/presets/{name}.yaml")
    return path


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file here nor in {REPO_ROOT} (give --config PATH, "
                          "or --config '' for the dataclass defaults)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def assignment(text: str) -> dict:
    """`a.b=value` as the nested mapping `{a: {b: value}}`, the value read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {err}") from None
    return nested(key.strip(), value)


def nested(path: str, value) -> dict:
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def merge(into: dict, update: dict) -> dict:
    """`update` into `into`, mappings key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def preset_values(name: str, cls, section: str | None) -> dict:
    """What preset `name` sets for config class `cls`: its shared keys `cls` has, and its `section`."""
    data = read_yaml(resolve_preset(name))
    unknown = sorted(set(data) - set(PRESET_SHARED) - set(STAGE_SECTIONS))
    if unknown:
        raise ConfigError(f"preset {name}: unknown keys {unknown}; valid keys: "
                          f"{[*PRESET_SHARED, *STAGE_SECTIONS]}")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: data[k] for k in PRESET_SHARED if k in data and k in fields}
    section_values = data.get(section) or {}
    if not isinstance(section_values, dict):
        raise ConfigError(f"preset {name}: section {section} must be a mapping")
    return merge(values, section_values)


def environment_sets(section: str | None, environ: dict | None = None) -> list[str]:
    """`SR_RAY_<SECTION>__A__B=value` variables of `section` as `a.b=value` assignments (sorted)."""
    if not section:
        return []
    prefix = f"SR_RAY_{section.upper()}__"
    environ = os.environ if environ is None else environ
    return [f"{name[len(prefix):].lower().replace('__', '.')}={value}"
            for name, value in sorted(environ.items()) if name.startswith(prefix)]


def load(cls, path: str | Path | None = None, *, preset: str | None = None, section: str | None = None,
         overrides: dict | None = None, sets: list[str] = (), where: str = ""):
    """The typed `cls` from YAML `path` < `preset` < the environment (`environment_sets`) < `overrides`
    ({dotted field: value}; None = not given) < `sets` (`a.b=value` strings). `where` prefixes the keys
    errors name (the demo's `train.`)."""
    values = read_yaml(path) if path else {}
    if preset:
        merge(values, preset_values(preset, cls, section))
    for text in environment_sets(section):
        merge(values, assignment(text))
    for key, value in (overrides or {}).items():
        if value is not None:
            merge(values, nested(key, value))
    for text in sets:
        merge(values, assignment(text))
    return build(cls, values, where)


def add_arguments(parser: argparse.ArgumentParser, default_config: str | None, section: str,
                  config: bool = True) -> None:
    """`--config` (unless `config` is False), `--preset` and `--set`: the same three on every stage."""
    if config:
        parser.add_argument("--config", default=default_config,
                            help=f"YAML config (default {default_config or 'none'}; '' = the dataclass defaults)")
    parser.add_argument("--preset", help=f"a name under configs/presets/ or a path: its `model` and `{section}:`")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any config field (dotted path, YAML value), repeatable")


def flag(parser, *names: str, field: str | None = None, **kwargs) -> None:
    """A flag that sets config field `field` (default: the first name, `-` as `_`); unset = not given."""
    field = field or names[0].lstrip("-").replace("-", "_")
    if kwargs.get("action") in (None, "append"):  # the help shows the field's name, not the dest
        kwargs.setdefault("metavar", field.rpartition(".")[2].upper())
    parser.add_argument(*names, dest=_FLAG + field, default=None, **kwargs)


def csv_list(value: str) -> list[str]:
    """A flag's `a,b,c` as a list."""
    return [v.strip() for v in value.split(",") if v.strip()]


def csv_ints(value: str) -> list[int]:
    """A flag's `1,2,3` as a list of ints."""
    return [int(v) for v in csv_list(value)]


def from_args(cls, args: argparse.Namespace, section: str, **values):
    """`load` with the parsed `--config`, `--preset`, flags (see `flag`) and `--set`; `values`: more fields."""
    path = getattr(args, "config", None)
    flags = {k.removeprefix(_FLAG): v for k, v in vars(args).items() if k.startswith(_FLAG)}
    return load(cls, config_file(path) if path else None, preset=args.preset, section=section,
                overrides=flags | values, sets=args.set)
