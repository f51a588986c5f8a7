"""How config values are read: one rule per field type, the same for a config file and the command line.

A config file is read with :class:`TextLoader`, which keeps plain scalars as the text written, and the
command line gives text too; :func:`coerce` then applies the field type's rule to that text. So
``tags: 1.10`` in a file and ``--wandb.tags 1.10`` both mean "1.10", and ``max_steps: 1e3`` means 1000
in both places (YAML 1.1's resolver would make the first 1.1 and leave the second a string).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml

from mmtrain.errors import ConfigError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")
_NULL = ("null", "none", "~", "")  # "" too: `entity:` with nothing after it is null in YAML


def _optional_inner(tp: Any) -> Any:
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner


def _accepted(tp: Any) -> str:
    """What a field of type ``tp`` accepts, in words, for error messages."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return f"{_accepted(_optional_inner(tp))} or null"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is list:
        return f"a list (a,b or [a, b]) whose items are each {_accepted(typing.get_args(tp)[0])}"
    return {int: "an integer such as 16, 1_000 or 1e3", float: "a finite number such as 0.001 or 5e-4",
            bool: "true or false (or yes/no, on/off)", str: "a string"}.get(tp, type_name(tp))


def _refused(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"{key} must be {_accepted(tp)} (got {value!r})")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to ``tp``, or raise ConfigError naming ``key``, the value and what is accepted.

    A scalar arrives as its text, the same from a config file (read_config_file keeps plain scalars as
    written) and from the command line, so ``tags: 1.10`` and ``--wandb.tags 1.10`` both mean "1.10". A
    file can also give a sequence or mapping (or a ``!!tagged`` value), and a Python caller of build_config
    ints, floats, bools, None and lists. One rule per type:

    - int: whole numbers in decimal, with underscores or in float notation ("16", "1_000", "1e3",
      "1000.0"), an int, or a float with no fractional part. Refused: "1.5", "abc", "0x10", nan, inf, bools.
    - float: what Python's float() reads ("5e-4", "1", ".5"), an int or a float, if finite: nan, inf and
      -inf are refused, and so are bools.
    - bool: true/false, yes/no, on/off in any case, or a bool. Refused: anything else, 1 and 0 included.
    - str: the text exactly as written ("1.10", "no", "null" and "" stay text); an int or float becomes its
      str(). Refused: sequences, mappings, bools, None.
    - X | None: null, none, ~ (any case) or empty text mean None; anything else follows X's rule.
    - Literal: one of the choices, as written (surrounding blanks ignored); a bool, which only a Python
      caller or ``!!bool`` can give, means the choice no/false/off (yes/true/on) when there is one.
    - list[X]: a sequence, item by item by X's rule. Text starting with [ or { is YAML flow syntax, so that
      "[a, b]" is the same list on the command line as in a file and items may contain commas ("[a, 'b,c']");
      other text is split on commas with blank items dropped ("a, b" -> ["a", "b"]; "2024" -> ["2024"];
      "" -> []). Any other single value is a one-element list.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            return None
        try:
            return coerce(key, value, _optional_inner(tp))
        except ConfigError:
            raise _refused(key, value, tp) from None  # "... or null": say everything that is accepted
    if origin is Literal:
        choices = typing.get_args(tp)
        choice = value.strip() if isinstance(value, str) else value
        if isinstance(value, bool):
            choice = next((c for c in (_TRUE if value else _FALSE) if c in choices), value)
        if choice not in choices:
            raise _refused(key, value, tp)
        return choice
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = value if isinstance(value, (list, dict)) else [value]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "{")):
                try:
                    items = yaml.load(text, Loader=TextLoader)
                except yaml.YAMLError:
                    raise _refused(key, value, tp) from None
            else:
                items = [item.strip() for item in text.split(",") if item.strip()]
        if not isinstance(items, list):
            raise _refused(key, value, tp)
        try:
            return [coerce(key, item, inner) for item in items]
        except ConfigError:
            raise _refused(key, value, tp) from None  # the whole value, as the user wrote it
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _refused(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (str, float)):
            # Decimal, not float: "1e20" and "12345678901234567891" stay exact.
            try:
                number = Decimal(value.strip() if isinstance(value, str) else value)
            except InvalidOperation:
                number = Decimal("nan")
            # adjusted() bounds the digits as int("...") does: int(Decimal("1e999999999")) would not return.
            if number.is_finite() and number == number.to_integral_value() and number.adjusted() < 4300:
                return int(number)
        raise _refused(key, value, tp)
    if tp is float:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # OverflowError: an int beyond the float range
                number = math.nan
            if math.isfinite(number):
                return number
        raise _refused(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _refused(key, value, tp)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


class TextLoader(yaml.SafeLoader):
    """SafeLoader that keeps every plain scalar as its text; only ``<<`` merge keys are still resolved.

    YAML 1.1's resolver would type them first (``1.10`` -> 1.1, ``2024`` -> int, ``no`` -> False, while
    ``1e3`` stays a string), so a value in a file would not mean what the same text means on the command
    line. ``coerce`` applies each field's own rule to the text instead.
    """

    yaml_implicit_resolvers: typing.ClassVar[dict[Any, list]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:merge"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def parse_yaml_file(path: str | Path, loader: type[yaml.SafeLoader], sections: Iterable[str]) -> dict[str, Any]:
    """The mapping in the YAML file at ``path`` read with ``loader`` ({} for an empty file); ConfigError
    naming the file (and line and column for a syntax error) otherwise. ``sections``: for the message."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = yaml.load(p.read_text(), Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{where}: not valid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections ({', '.join(sections)})")
    return raw
