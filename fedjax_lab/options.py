"""Typed, documented, validated options: the one mechanism behind every config of the library.

An algorithm's, a data set's, a model's and a run's configuration are each a frozen dataclass whose
fields are declared with `option(default, doc, check)`. From those declarations alone this module
validates a config (types from the annotations, ranges from the checks), reads one from a nested
mapping (a TOML or JSON file: unknown keys and wrong types are refused, naming the key), writes it
back (`to_dict`, which `from_dict` inverts exactly), parses a command-line value by the field's type,
and describes the options for `fedjax-lab list`. Nested dataclass fields (a `ClientTraining` inside
an algorithm's config) are options too, addressed with dotted paths (`client.lr`).

Every error is an `OptionError` whose message names the option's full path, the value and what is
allowed, in one line.
"""

import dataclasses
import math
import types
import typing
from typing import Any, Callable, Iterator

import numpy as np

# check(value) -> None if acceptable, else a phrase saying what is expected.
Check = Callable[[Any], str | None]


class OptionError(ValueError):
    """A bad option: its dotted `path`, the offending `value` and what is `expected`."""

    def __init__(self, path: str, value: Any, expected: str):
        self.path, self.value, self.expected = path, value, expected
        super().__init__(f"{path}={value!r} is invalid; {expected}")


def option(default: Any, doc: str, check: Check | None = None, *,
           sweepable: bool = False) -> Any:
    """A config field with its default, one-line documentation and range check.

    `sweepable` marks a plain number that can vary across the runs of one compiled sweep (a
    learning rate, mu, lambda), as opposed to structural options (epochs, batch size): the builder
    takes it as a traced 0-d array (`replace_paths`), so it never branches on its value in Python
    (None, where allowed, is structure). tests/test_registry_contract.py checks every one.
    """
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check,
                                                        "sweepable": sweepable})


def positive(value) -> str | None:
    return None if value > 0 else "expected a number > 0"


def non_negative(value) -> str | None:
    return None if value >= 0 else "expected a number >= 0"


def fraction(value) -> str | None:
    return None if 0 <= value <= 1 else "expected a fraction in [0, 1]"


def below_one(value) -> str | None:
    return None if 0 <= value < 1 else "expected 0 <= value < 1"


def open_fraction(value) -> str | None:
    return None if 0 < value < 1 else "expected a fraction strictly between 0 and 1"


def one_of(*allowed: str) -> Check:
    def check(value):
        return None if value in allowed else f"allowed: {', '.join(allowed)}"
    check.allowed = allowed
    return check


def optional(check: Check) -> Check:
    """`check`, except that None is accepted."""
    return lambda value: None if value is None else check(value)


def positive_int(value) -> str | None:
    return None if value >= 1 else "expected a positive integer"


def non_negative_int(value) -> str | None:
    return None if value >= 0 else "expected an integer >= 0"


optional_positive_int = optional(positive_int)


def all_positive(value) -> str | None:
    return None if all(v > 0 for v in value) else "expected positive entries"


# --- reading the declarations ---------------------------------------------------------------------

def is_config(value_or_type) -> bool:
    return dataclasses.is_dataclass(value_or_type)


def _hints(config_type: type) -> dict[str, Any]:
    return typing.get_type_hints(config_type)


def _alternatives(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def type_name(annotation) -> str:
    parts = []
    for alternative in _alternatives(annotation):
        if alternative is type(None):
            parts.append("None")
        elif typing.get_origin(alternative) is tuple:
            parts.append(f"list of {type_name(typing.get_args(alternative)[0])}")
        else:
            parts.append(getattr(alternative, "__name__", str(alternative)))
    return " or ".join(parts)


def _coerce(path: str, value: Any, annotation) -> Any:
    """`value` as `annotation` (an int where a float is expected, a list as a tuple), or raises."""
    for alternative in _alternatives(annotation):
        if alternative is type(None):
            if value is None:
                return None
        elif alternative is bool:
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
        elif alternative is int:
            if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
                return int(value)
        elif alternative is float:
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                    value, (bool, np.bool_)):
                if not math.isfinite(float(value)):
                    raise OptionError(path, value, "expected a finite number")
                return float(value)
        elif alternative is str:
            if isinstance(value, str):
                return value
        elif typing.get_origin(alternative) is tuple:
            if isinstance(value, (list, tuple)):
                (item,) = typing.get_args(alternative)[:1]
                return tuple(_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value))
        elif is_config(alternative):
            if isinstance(value, alternative):
                return value
            if isinstance(value, dict):
                return from_dict(alternative, value, path)
    raise OptionError(path, value, f"expected {type_name(annotation)}")


def validate(config, prefix: str = "") -> None:
    """Raises `OptionError` for the first field of `config` whose type or range is wrong."""
    hints = _hints(type(config))
    for field in dataclasses.fields(config):
        path = f"{prefix}{field.name}"
        value = getattr(config, field.name)
        coerced = _coerce(path, value, hints[field.name])
        if is_config(coerced):
            validate(coerced, path + ".")
            continue
        check = field.metadata.get("check")
        problem = None if check is None or coerced is None else check(coerced)
        if problem:
            raise OptionError(path, value, problem)
    config_check = getattr(config, "check", None)
    if config_check is not None:
        try:
            config_check()
        except OptionError as error:
            raise OptionError(prefix + error.path, error.value, error.expected) from None


def from_dict(config_type: type, mapping: dict, prefix: str = "", *, base=None):
    """A `config_type` from a (possibly partial) nested mapping over `base` (default: defaults).

    Unknown keys are refused, naming them and the allowed ones; values are coerced to the field
    types (a list becomes a tuple, an integer a float) and validated.
    """
    if not isinstance(mapping, dict):
        raise OptionError(prefix.rstrip(".") or "config", mapping, "expected a table of options")
    base = config_type() if base is None else base
    fields = {field.name: field for field in dataclasses.fields(config_type)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise OptionError(prefix + unknown[0], mapping[unknown[0]],
                          f"unknown option; allowed: {', '.join(fields)}")
    hints = _hints(config_type)
    changes = {}
    for name, value in mapping.items():
        current = getattr(base, name)
        if is_config(current) and isinstance(value, dict):
            changes[name] = from_dict(type(current), value, f"{prefix}{name}.", base=current)
        else:
            changes[name] = _coerce(prefix + name, value, hints[name])
    config = dataclasses.replace(base, **changes)
    validate(config, prefix)
    return config


def to_dict(config) -> dict:
    """The config as a nested dict of JSON/TOML values (tuples as lists); `from_dict` inverts it."""
    def plain(value):
        if is_config(value):
            return to_dict(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value
    return {field.name: plain(getattr(config, field.name)) for field in dataclasses.fields(config)}


def parse_text(path: str, text: str, annotation) -> Any:
    """A command-line value for a field of type `annotation` ('none' for None, commas for lists)."""
    alternatives = _alternatives(annotation)
    if text.lower() in ("none", "null", "full") and type(None) in alternatives:
        return None
    for alternative in alternatives:
        if alternative is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if alternative is int:
            try:
                return int(text)
            except ValueError:
                pass
        if alternative is float:
            try:
                return float(text)
            except ValueError:
                pass
        if typing.get_origin(alternative) is tuple:
            (item,) = typing.get_args(alternative)[:1]
            parts = [part for part in text.split(",") if part.strip()]
            return tuple(parse_text(f"{path}[{i}]", part.strip(), item)
                         for i, part in enumerate(parts))
        if alternative is str:
            return text
    raise OptionError(path, text, f"expected {type_name(annotation)}")


def field_annotation(config_type: type, dotted: str, prefix: str = ""):
    """The annotation of the (possibly nested) field `dotted` of `config_type`, or raises."""
    head, _, rest = dotted.partition(".")
    fields = field_names(config_type)
    if head not in fields:
        raise OptionError(prefix + dotted, "", f"unknown option; allowed: {', '.join(fields)}")
    annotation = _hints(config_type)[head]
    if not rest:
        return annotation
    nested = next((a for a in _alternatives(annotation) if is_config(a)), None)
    if nested is None:
        raise OptionError(prefix + dotted, "", f"{prefix}{head} has no sub-options")
    return field_annotation(nested, rest, f"{prefix}{head}.")


def field_names(config_type: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(config_type))


def flatten(mapping: dict, prefix: str = "") -> dict:
    """`{"a.b": value}` for `{"a": {"b": value}}`: the inverse of `nest` and `merge`."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def nest(dotted: str, value: Any) -> dict:
    """`{"a": {"b": value}}` for `"a.b"`."""
    head, _, rest = dotted.partition(".")
    return {head: nest(rest, value) if rest else value}


def merge(base: dict, update: dict) -> dict:
    """Deep merge of two nested mappings, `update` winning."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe(config, prefix: str = "") -> Iterator[tuple[str, str, Any, str, bool]]:
    """(path, type, default, doc, sweepable) for each leaf option of a config class or instance;
    the defaults shown are the instance's (a class's own defaults for a class)."""
    defaults = config() if isinstance(config, type) else config
    hints = _hints(type(defaults))
    for field in dataclasses.fields(defaults):
        default = getattr(defaults, field.name)
        if is_config(default):
            yield from describe(default, f"{prefix}{field.name}.")
            continue
        check = field.metadata.get("check")
        doc = field.metadata.get("doc", "")
        allowed = getattr(check, "allowed", None)
        if allowed:
            doc = f"{doc} ({' | '.join(allowed)})"
        yield (prefix + field.name, type_name(hints[field.name]), default, doc,
               field.metadata.get("sweepable", False))


def sweepable_paths(config_type: type) -> tuple[str, ...]:
    return tuple(path for path, *_, sweepable in describe(config_type) if sweepable)


def replace_paths(config, values: dict[str, Any], prefix: str = ""):
    """`config` with the options at the dotted paths of `values` replaced, nested groups rebuilt.

    Nothing is coerced or validated, so a value may be a traced array: a sweep builds an algorithm
    inside a jitted (or vmapped) function from its config with every sweepable option a tracer,
    after validating each concrete grid point. Unknown paths raise `OptionError`.
    """
    changes, nested = {}, {}
    names = field_names(type(config))
    for dotted, value in values.items():
        head, _, rest = dotted.partition(".")
        if head not in names:
            raise OptionError(prefix + dotted, value,
                              f"unknown option; allowed: {', '.join(names)}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            changes[head] = value
    for head, group in nested.items():
        current = getattr(config, head)
        if not is_config(current):
            raise OptionError(f"{prefix}{head}.{next(iter(group))}", current,
                              f"{prefix}{head} has no sub-options")
        changes[head] = replace_paths(current, group, f"{prefix}{head}.")
    return dataclasses.replace(config, **changes)
