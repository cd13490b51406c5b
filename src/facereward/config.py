"""Dataclass configs from YAML files and `key=value` overrides (dotted keys reach nested configs)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names where it came from."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type; errors name `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
            return _YAML11_BOOLS[value.lower()]
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _child(where: str, key: str) -> str:
    """'file.yaml:' + 'run' -> 'file.yaml: run'; 'file.yaml: run' + 'seed' -> 'file.yaml: run.seed'."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


# Keys that were renamed, per config class: old key -> its new (dotted) key. A saved config with an old key gets a
# one-line error naming the new one, so its owner knows what to change.
RENAMED: dict[str, dict[str, str]] = {
    "ReFLConfig": {"steps": "train_steps", "sampling_steps": "sample_steps", "frm": "rewards.options.frm.path",
                   "structural_weight": "losses.weights.wavelet", "wavelet": "losses.options.wavelet.wavelet",
                   "wavelet_levels": "losses.options.wavelet.levels", "lpips_weight": "losses.weights.lpips",
                   "lpips_net": "losses.options.lpips.net", "lpips_backbone": "losses.options.lpips.backbone_path",
                   "lpips_heads": "losses.options.lpips.heads_path"},
    "LRPOConfig": {"steps": "sample_steps"},
    "HeldOutConfig": {"steps": "held_out.sample_steps"},
    "TrainFRMConfig": {"steps": "train_steps"},
    "MeasuresConfig": {"imports": "imports (at the top level of the config)"},
    "DataConfig": {"imports": "imports (at the top level of the config)"},
    "EvaluateConfig": {"steps": "sample_steps", "metrics": "measures", "metric_options": "options",
                       "lpips_net": "options.lpips.net", "lpips_backbone": "options.lpips.backbone_path",
                       "lpips_heads": "options.lpips.heads_path", "frm": "options.frm.path", "clipiqa": "options.clipiqa.path",
                       "niqe_model": "options.niqe.model", "reward_weights": "reward.weights", "reward_options": "reward.options",
                       "kid_subsets": "options.kid.subsets", "kid_subset_size": "options.kid.subset_size"},
}


def _renamed(cls: type, key: str) -> str | None:
    return RENAMED.get(cls.__name__, {}).get(key)


def _over_default(f: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a nested config fills in from that field's own default (e.g. ReFL's `rewards` weights
    {frm: 1}), not from the nested class's defaults; anything else is returned as it is."""
    if not isinstance(value, dict):
        return value
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return value
    return {**{g.name: getattr(default, g.name) for g in dataclasses.fields(default)}, **value}


def config_from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    for key in unknown:
        if _renamed(cls, key):
            raise ConfigError(f"{_child(where, key)}: this key was renamed: use {_renamed(cls, key)}")
    if unknown:
        raise ConfigError(f"{where.rstrip(':')}: unknown key {unknown[0]!r} for {cls.__name__} (known: {', '.join(types_)})")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(_over_default(defaults[k], v), types_[k], _child(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where.rstrip(':')}: {err}") from None


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's booleans: only true/false are booleans, so `mixed_precision: no` stays the string "no"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def load_yaml(text: str) -> Any:
    """Parse config YAML (safe; yes/no/on/off are strings, which boolean fields still accept)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3); the value is read as YAML (so 1e-4, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type of a field annotated `X` or `X | None`, else None."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        return found[0] if len(found) == 1 else None
    return None


def check_override(cls: type, text: str) -> None:
    """Check one `--set KEY=VALUE` against `cls`: an unknown key or a wrongly typed value is an error naming `--set`.

    Keys inside a free-form mapping field (e.g. `rewards.weights.NAME`) are not checked here.
    """
    keys, value = parse_override(text)
    node: Any = cls
    for depth, key in enumerate(keys):
        types_ = _field_types(node)
        if key not in types_:
            where = ".".join(keys[:depth]) or cls.__name__
            if _renamed(node, key):
                raise ConfigError(f"--set {text}: key {'.'.join(keys[:depth + 1])} was renamed: use {_renamed(node, key)}")
            raise ConfigError(f"--set {text}: unknown key {key!r} in {where} (known: {', '.join(types_)})")
        tp = types_[key]
        if depth == len(keys) - 1:
            _coerce(value, tp, f"--set {text}")
            return
        child = _dataclass_in(tp)
        if child is None:
            return  # a mapping or Any: its keys are free-form
        node = child


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Build `cls` from an optional YAML file, then apply `key=value` overrides (dotted for nesting).

    Errors name their source: the file for its own keys, `--set KEY=VALUE` for an override. Under
    FACEREWARD_SMOKE=1 the class's `SMOKE` caps are applied last (facereward.smoke).
    """
    from facereward import smoke

    overrides = list(overrides)
    for text in overrides:
        check_override(cls, text)
    data: dict[str, Any] = {}
    where = "config:"
    if path is not None:
        path = Path(path)
        where = f"{path}:"
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = load_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    config = config_from_dict(cls, data, where)
    if overrides:  # on the whole config, so `--set losses.weights.lpips=0` keeps the other weights
        data = config_to_dict(config)
        for text in overrides:
            keys, value = parse_override(text)
            node = data
            for k in keys[:-1]:
                node = node.setdefault(k, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {k} is not a section")
            node[keys[-1]] = value
        config = config_from_dict(cls, data, where)
    return smoke.cap_config(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML-safe data."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
