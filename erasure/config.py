"""Configs are data: dataclasses whose fields carry their help, allowed values and ranges.

`load_config(Cls, path, overrides)` reads an optional YAML file, applies flag overrides and
validates every key: an unknown key, a wrong type or an out-of-range value raises `ConfigError`
naming the key and what is allowed. The CLI builds its flags from the same fields, so `--help`,
YAML files and the Python API can never disagree.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from erasure.errors import ConfigError

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    *,
    choices: typing.Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    flag: str | None = None,
) -> Any:
    """A config field with its help text and the values it admits (`flag` renames its CLI flag, e.g. 'class')."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "flag": flag}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A config field holding a nested settings dataclass: a mapping under its name in YAML, `name.key` in
    overrides, `--name-key` flags on the command line."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


def with_method_sections(name: str, base: type, registry: typing.Mapping[str, type], doc: str, module: str) -> type:
    """`base` plus one `section` per method of `registry` that has settings of its own (flags `--<method>-<key>`
    unless a setting renames its flag); `name`, `doc` and `module` describe the composed dataclass."""
    sections = [(method, settings, section(settings, f"settings of method {method} (used when method is {method})"))
                for method, settings in registry.items() if dataclasses.fields(settings)]
    return dataclasses.make_dataclass(name, sections, bases=(base,), namespace={"__doc__": doc, "__module__": module})


def reject_other_sections(config: Any, sections: typing.Iterable[str], method: str, active: str) -> None:
    """A ConfigError when a method section other than `active` (the section of `method`) differs from its
    defaults: settings the run would silently ignore."""
    for name in sorted(set(sections) - {active}):
        given = getattr(config, name, None)
        if given is not None and given != type(given)():
            raise ConfigError(f"config key '{name}' holds settings of method {name}, but the method is {method}; "
                              f"drop them or pass --method {name}")


TRACKERS = ("tensorboard", "wandb")


@dataclasses.dataclass
class TrackerConfig:
    """The experiment tracker field every training command shares (composed into its config)."""

    log_with: str | None = option(None, "experiment tracker of the training loop (needs its package installed; "
                                        "default: none)", choices=TRACKERS)


def is_section(f: dataclasses.Field) -> bool:
    """Whether `f` holds a nested settings dataclass (see `section`)."""
    return bool(f.metadata.get("section"))


def fields(cls: type) -> list[dataclasses.Field]:
    """The config fields of a dataclass, in declaration order."""
    return list(dataclasses.fields(cls))


def field_type(cls: type, f: dataclasses.Field) -> Any:
    """The resolved annotation of a field (annotations are strings under `from __future__`)."""
    return typing.get_type_hints(cls)[f.name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def type_name(tp: Any) -> str:
    """A readable name for a field type, used in help and errors."""
    inner, optional = _unwrap_optional(tp)
    if inner is dict or typing.get_origin(inner) is dict:
        name = "mapping (YAML like '{lr: 0.1}' on the command line)"
    elif typing.get_origin(inner) is list:
        name = f"list of {typing.get_args(inner)[0].__name__} (comma-separated on the command line)"
    else:
        name = inner.__name__
    return f"{name} or null" if optional else name


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a flag string) to `tp`, or raise ConfigError naming `key`."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must be a {type_name(tp)}, got null; set a value")
    origin = typing.get_origin(inner)
    if inner is dict or origin is dict:
        return _coerce_mapping(key, value, tp)
    if origin is list:
        item_type = typing.get_args(inner)[0]
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a {type_name(tp)}, got {value!r}")
        return [coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(items)]
    return _coerce_scalar(key, value, inner, tp)


def _coerce_mapping(key: str, value: Any, tp: Any) -> dict[str, Any]:
    if isinstance(value, str):
        import yaml

        try:
            value = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config key '{key}' must be a mapping (YAML like '{{lr: 0.1}}'): {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"config key '{key}' must be a mapping of names to values, got {value!r}")
    return dict(value)


def _coerce_scalar(key: str, value: Any, inner: type, tp: Any) -> Any:
    problem = f"config key '{key}' must be a {type_name(tp)}, got {value!r} ({type(value).__name__})"
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(problem)
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(problem)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(problem) from None
        raise ConfigError(problem)
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(problem)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(problem) from None
        raise ConfigError(problem)
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(problem)
    raise TypeError(f"unsupported config field type {inner!r} for '{key}'")


def check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    """Raise ConfigError if `value` is outside the choices or bounds declared for `key`."""
    if isinstance(value, dict):
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if meta.get("choices") and v not in meta["choices"]:
            allowed = ", ".join(map(str, meta["choices"]))
            hint = difflib.get_close_matches(str(v), [str(c) for c in meta["choices"]], n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"config key '{key}' must be one of: {allowed}; got '{v}'{did_you_mean}")
        bounds = [("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                  ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")]
        for name, ok, symbol in bounds:
            bound = meta.get(name)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"config key '{key}' must be {symbol} {bound}; got {v}")


def _nest_dotted(data: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Fold 'section.key' entries (flag overrides) into the mapping of their section; they win over it."""
    nested: dict[str, Any] = {key: value for key, value in data.items() if "." not in key}
    for key, value in data.items():
        if "." in key:
            head, _, rest = key.partition(".")
            inner = nested.get(head)
            nested[head] = {**(inner if isinstance(inner, dict) else {}), rest: value}
    return nested


def from_dict(cls: type[C], data: typing.Mapping[str, Any], source: str = "config", prefix: str = "") -> C:
    """Build and validate a config dataclass from a mapping of raw values (`prefix` names a nested section)."""
    data = _nest_dotted(data)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}' in {source}{did_you_mean} Allowed keys: "
                f"{', '.join(prefix + k for k in known)}"
            )
    values = {}
    for key, value in data.items():
        f = known[key]
        if is_section(f):
            values[key] = _section_value(cls, f, value, source, prefix)
            continue
        values[key] = coerce(prefix + key, value, field_type(cls, f))
        check_range(prefix + key, values[key], f.metadata)
    config = cls(**values)
    for f in fields(cls):
        if f.name not in values and not is_section(f):
            check_range(prefix + f.name, getattr(config, f.name), f.metadata)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _section_value(cls: type, f: dataclasses.Field, value: Any, source: str, prefix: str) -> Any:
    tp = field_type(cls, f)
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{prefix}{f.name}' must be a mapping of its settings (e.g. "
                          f"{{{fields(tp)[0].name if fields(tp) else 'key'}: ...}}), got {value!r}")
    return from_dict(tp, value, source, prefix=f"{prefix}{f.name}.")


def class_index(value: str | int, classes: typing.Sequence[str], what: str) -> int:
    """A class given by name or index, as its index; anything else is a ConfigError naming `what` and the classes."""
    text = str(value).strip()
    if text in classes:
        return list(classes).index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise ConfigError(f"unknown class '{value}' in {what}; choose one of: {', '.join(classes)} "
                      f"(or an index 0-{len(classes) - 1})")


def config_path(path: str | Path) -> Path:
    """`path`; when it is missing and lies under configs/, the copy shipped in the installed package (so the
    README's `--config configs/...` commands work from any directory)."""
    path = Path(path)
    if not path.is_file() and path.parts[:1] == ("configs",):
        from importlib.resources import files

        packaged = Path(str(files("configs").joinpath(*path.parts[1:])))
        if packaged.is_file():
            return packaged
    return path


# YAML 1.1 (PyYAML) reads `1e-05` as a string (its floats need a dot); YAML 1.2, and every user, reads a float.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


@functools.cache
def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that also resolves exponent floats without a dot (`1e-05`, `3E4`)."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
    return Loader


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that `1e-05` is the float it looks like, not a string."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (see `config_path`), with errors that say which file is wrong and how."""
    import yaml

    path = config_path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config (see configs/)")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML ({exc}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: typing.Mapping[str, Any] | None = None) -> C:
    """Load `cls` from an optional YAML file, then apply `overrides` (e.g. command-line flags)."""
    data = read_yaml(path) if path else {}
    data.update(overrides or {})
    source = f"'{path}'" if path else "the command line"
    return from_dict(cls, data, source=source)


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data, for manifests."""
    return dataclasses.asdict(config)


def grid(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a search space's values, keys in sorted order (a stable point numbering)."""
    keys = sorted(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]
