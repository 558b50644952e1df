"""How configs are read and checked: sections built from dicts with each value coerced to its
field's type, dotted overrides (`--set model.d_model=384`), and each field's one-line docs."""

from __future__ import annotations

import dataclasses
import difflib
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from burrow.errors import UserError


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not one of {', '.join(choices)}")


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where, without its drawing of the line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    context = getattr(error, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{f' ({context})' if context else ''}{where}"


def check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise UserError(f"{name} must be positive, got {value}")


def field_docs(kind: type) -> dict[str, str]:
    """Each field's one-line documentation: the comment above it in this file."""
    import inspect

    lines = inspect.getsource(kind).splitlines()
    docs, comment = {}, []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0]
        if comment and ":" in stripped and name.isidentifier():
            docs[name] = " ".join(comment)
        comment = []
    return docs


def build_section(kind: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"config section {section!r} must be a mapping")
    names = [f.name for f in dataclasses.fields(kind)]
    for key in values:
        if key not in names:
            raise UserError(f"unknown field {section}.{key}{suggest(key, names, section)}")
    hints = get_type_hints(kind)
    return kind(**{key: build_value(hints[key], value, f"{section}.{key}")
                   for key, value in values.items()})


def build_value(hint: Any, value: Any, name: str) -> Any:
    """A field's value: a section built from its dict (an optional section may be None), or a
    plain value coerced to the field's type."""
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value or {}, name)
    optional = [arg for arg in get_args(hint) if dataclasses.is_dataclass(arg)]
    if get_origin(hint) in (Union, types.UnionType) and optional:
        return None if value is None else build_section(optional[0], value, name)
    return coerce(value, hint, name)


def suggest(name: str, names: list[str], section: str) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(f'{section}.{c}' for c in close)}?)" if close else ""


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise UserError."""
    text = getattr(hint, "__name__", str(hint))
    if value is None:
        if "None" in text:
            return None
        raise UserError(f"{name} cannot be empty")
    if text.startswith("list"):  # checked by the config's own validate
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list, got {value!r}")
        return list(value)
    try:
        if hint is bool or text == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int or text.startswith("int"):
            if isinstance(value, str) and value.lower() in ("none", "null") and "None" in text:
                return None
            number = float(value)
            if number != int(number):
                raise ValueError(value)
            return int(number)
        if hint is float or text.startswith("float"):
            return float(value)
        if isinstance(value, str) and value.lower() in ("none", "null") and "None" in text:
            return None
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a valid {text}") from None


def override_dict(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `section.field=value` (or `section.sub.field=value`) in a config's dict form,
    unvalidated: the caller validates once, after every change (flags and --set) is in."""
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in ("model", "train", "data"):
            raise UserError(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of "
                            "model, train, data (e.g. --set model.d_model=384)")
        *parents, leaf = name.split(".")
        target = raw[section]
        for part in parents:
            if not isinstance(target.get(part), dict):
                raise UserError(f"--set {item!r}: {section}.{part} is not a section of fields")
            target = target[part]
        try:
            target[leaf] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as error:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({yaml_problem(error)})"
                            "; quote it, e.g. --set 'data.source=\"a: b\"'") from None
    return raw
