"""The generic half of the config: nested dicts (YAML, dotted overrides) <-> typed dataclasses.

``from_dict`` builds a dataclass from a nested dict, checking every key and type; errors name the
dotted key and suggest the closest valid one. It also records which dotted keys the dict held
(:func:`user_keys`): a dataclass that declares a :func:`key_record` field gets that set, so code
can tell a value the user chose from a default (``is_user_set(cfg, "model.preprocess.mean")``).
The record is not a config key: ``from_dict`` never reads it from the input and ``to_dict``
never writes it. The concrete config classes and their defaults live in the section modules of
:mod:`ssd.config`; they check their values with :func:`check_choice` and :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the key and what is valid.

    ``key``: the dotted key at fault (``"model.extras[0].mid"``, or the section of a cross-field check),
    where :func:`from_dict` knows it; :func:`load_yaml` uses it to point at the file's line.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    """Raise a :class:`ConfigError` naming ``key`` and the closest valid value unless ``value`` is in ``valid``."""
    if value not in valid:
        hint = difflib.get_close_matches(str(value), valid, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: invalid value {value!r}{extra}; valid: {', '.join(valid)}")


# PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string; float fields accept it
SCIENTIFIC_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# --- reading ---------------------------------------------------------------------------------


def read_yaml_dict(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The nested dict of a YAML file (None: empty) with dotted ``key=value`` overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    for item in overrides:
        apply_override(data, item)
    return data


def load_yaml(cls: type, path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """``from_dict(cls, read_yaml_dict(path, overrides))``; an error the file makes on its own names it
    and the key's line (``configs/x.yaml, line 4: unknown config key 'model.num_clases' ...``).

    An error the overrides make (the file alone builds, or fails otherwise) is raised as it is: it
    already names the dotted key the override wrote.
    """
    data = read_yaml_dict(path, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if path is None or (overrides and not _fails_alone(cls, path, e)):
            raise
        line = yaml_key_line(Path(path).read_text(), e.key)
        raise ConfigError(f"{path}{f', line {line}' if line else ''}: {e}", e.key) from None


def _fails_alone(cls: type, path: str | os.PathLike, error: ConfigError) -> bool:
    """Whether the YAML file without the overrides fails with ``error`` (only asked on the error path)."""
    try:
        from_dict(cls, read_yaml_dict(path))
    except ConfigError as alone:
        return str(alone) == str(error)
    return False


def yaml_key_line(text: str, key: str | None) -> int | None:
    """The 1-based line of dotted ``key`` (``model.extras[0].mid``) in YAML ``text``, or of its deepest
    section there; None when not even the first part is found."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key or ""):
        if isinstance(node, yaml.MappingNode):
            found = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
            if not found:
                break
            line, node = found[-1][0].start_mark.line + 1, found[-1][1]  # the last duplicate wins, as in safe_load
        elif isinstance(node, yaml.SequenceNode) and part.startswith("[") and int(part[1:-1]) < len(node.value):
            node = node.value[int(part[1:-1])]
            line = node.start_mark.line + 1
        else:
            break
    return line


def apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b.c=value`` -> ``data["a"]["b"]["c"] = yaml(value)``; unknown keys are caught by ``from_dict``."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=0.002")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


# --- the record of user-set keys ---------------------------------------------------------------


def key_record() -> Any:
    """A dataclass field holding the dotted keys its ``from_dict`` input set (``frozenset[str]``).

    ``init=True`` so ``dataclasses.replace`` carries it over; ``compare=False`` so two configs with
    the same values are equal however they were written.
    """
    return dataclasses.field(default_factory=frozenset, compare=False, repr=False, metadata={"record": True})


def config_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are config keys (everything but a :func:`key_record`)."""
    return [f for f in dataclasses.fields(cls_or_obj) if not f.metadata.get("record")]


def user_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    """Every dotted key of a nested dict: sections and the keys listed inside them.

    ``{"model": {"priors": {"scales": [...]}}}`` -> ``{"model", "model.priors", "model.priors.scales"}``;
    a section lists only the sub-keys it names. Lists (``model.extras``) are one key.
    """
    keys = set()
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys.add(dotted)
        if isinstance(value, dict):
            keys |= user_keys(value, dotted)
    return keys


def is_user_set(cfg: Any, key: str) -> bool:
    """Whether dotted ``key`` (e.g. ``"model.preprocess.mean"``, or a section ``"model.priors"``) was
    in the YAML file or the overrides that built ``cfg`` rather than a default.

    Every key written in a file counts, so a run's resolved ``config.yaml`` sets every key.
    A config built in code (``Config()``) sets none.
    """
    return key in recorded_keys(cfg)


def recorded_keys(cfg: Any) -> frozenset[str]:
    """The dotted keys recorded on ``cfg`` (empty for a dataclass without a :func:`key_record`)."""
    records = [f.name for f in dataclasses.fields(cfg) if f.metadata.get("record")]
    return frozenset().union(*(getattr(cfg, name) for name in records))


# --- dict <-> dataclass ------------------------------------------------------------------------


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, validating keys and types.

    A :func:`key_record` field of ``cls`` receives the dotted keys of ``data`` (:func:`user_keys`).
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in config_fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f" (did you mean {prefix + '.' if prefix else ''}{hint[0]}?)" if hint else ""
            raise ConfigError(f"unknown config key {dotted!r}{extra}; valid keys here: {', '.join(names)}", dotted)
        try:
            kwargs[key] = _coerce(hints[key], value, dotted)
        except ConfigError as e:  # a bad value, or a section's cross-field check: the innermost key names it
            e.key = e.key or dotted
            raise
    for f in dataclasses.fields(cls):
        if f.metadata.get("record"):
            kwargs[f.name] = frozenset(user_keys(data, prefix))
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]  # as it is: it names the innermost key
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1]
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and SCIENTIFIC_NUMBER.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict of builtins (YAML- and ``torch.load(weights_only=True)``-safe).

    As ``dataclasses.asdict``, without the :func:`key_record` fields (they are not config keys).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in config_fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``to_dict(cfg)`` as YAML: every key, so loading it back sets every key (:func:`is_user_set`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
