"""Checking one setting's value: the rules as data (`Spec`), one check per kind, and the words.

A Spec says what a setting accepts (an integer of at least 1, one of some names, a size like 5GB,
a percentage...). `check_value(spec, value, label)` returns the value in the form the stages take
(a percentage as a fraction, a list of names as a tuple) or raises one LPError line naming `label`
as the user wrote it: `--tokens` on the command line, `score.tokens` in a recipe. settings.py
attaches a Spec to every field of every stage's settings.

Light on purpose (`lpconvert --help` imports the CLI): no torch or transformers.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import LPError

DEVICES = ("auto", "cpu", "cuda", "mps")  # runtime.resolve_device, plus cuda:N
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
              "B": 1}


@dataclass(frozen=True)
class Spec:
    """What one setting accepts. `kind` is a key of CHECKS."""

    kind: str  # int | ints | number | numbers | bool | text | choice | choices | size | percent | device | target
    example: Any  # a good value, shown in the fix: "e.g. tokens: 16384" / "e.g. --tokens 16384"
    min: float | None = None  # inclusive
    above: float | None = None  # exclusive: a speedup above 1, a loss budget above 0
    max: float | None = None  # inclusive
    choices: tuple[str, ...] = ()
    optional: bool = False  # null (None) is valid: "not set, the stage decides"


def int_spec(example: int, min: int | None = None, max: int | None = None) -> Spec:
    return Spec("int", example, min=min, max=max)


# plan.target holds exactly one of these; each mirrors plan.parse_target (and pairs_for_target for depth).
TARGETS: dict[str, Spec] = {
    "pairs": int_spec(4, min=1),
    "depth": int_spec(25, min=1),
    "speedup": Spec("number", 1.1, above=1),
    "max_loss_increase": Spec("percent", "5%", above=0),
}


# ----------------------------------------------------------------------------------------------
# Checking one value


def check_target(kind: str, value: Any, label: str) -> Any:
    """One target's value (check_target("depth", 25, "--depth")); its kind must be a key of TARGETS."""
    return check_value(TARGETS[kind], value, label)


def check_value(spec: Spec, value: Any, label: str) -> Any:
    if value is None and spec.optional:
        return None
    return CHECKS[spec.kind](spec, value, label)


def closest(name: str, options) -> str:
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else f"valid: {', '.join(options)}"


def _refuse(spec: Spec, value: Any, label: str, fix: str | None = None) -> LPError:
    return LPError(f"{label} must be {describe(spec)}, got {shown(value)}", fix or example_fix(spec, label))


def describe(spec: Spec) -> str:
    """What a spec accepts, in words: 'a positive integer', 'one of kl, loss'."""
    text = {
        "int": _integer_words(spec.min) + (f" up to {spec.max:,}" if spec.max is not None else ""),
        "ints": "a non-empty list of " + _integer_words(spec.min).replace("an ", "").replace("a ", "") + "s",
        "number": "a number" + _range_words(spec),
        "numbers": "a non-empty list of numbers" + _range_words(spec),
        "bool": "true or false",
        "text": "a non-empty string",
        "choice": "one of " + ", ".join(spec.choices),
        "choices": "a non-empty list of " + ", ".join(spec.choices),
        "size": "a size like 5GB, 500MB or 2GiB",
        "percent": ("a positive" if spec.above == 0 else "a") + " percentage like 5%",
        "device": "auto, cpu, cuda, cuda:N or mps",
        "target": "a mapping holding exactly one of " + ", ".join(TARGETS),
    }[spec.kind]
    return f"{text} (or null)" if spec.optional else text


def _integer_words(low: float | None) -> str:
    return {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        low, f"an integer of at least {low}")


def _range_words(spec: Spec) -> str:
    if spec.min is not None and spec.max is not None:
        return f" between {spec.min:g} and {spec.max:g}"
    if spec.above is not None:
        return f" above {spec.above:g}"
    return f" of at least {spec.min:g}" if spec.min is not None else ""


def shown(value: Any) -> str:
    """The value as the user wrote it, YAML-ish and short enough for one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = _bounded_repr(value, 60)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounded_repr(value: Any, limit: int) -> str:
    """repr(value), stopped soon after `limit` characters: a YAML alias bomb is billions of items once
    expanded, and a self-referencing alias never ends, so the rest is never rendered."""
    if not isinstance(value, (list, tuple, dict)) or limit <= 0:
        return repr(value)[: max(limit, 0) + 1]
    items = (f"{_bounded_repr(k, limit - 2)}: {_bounded_repr(v, limit - 2)}" for k, v in value.items()) \
        if isinstance(value, dict) else (_bounded_repr(item, limit - 2) for item in value)
    opener, closer = "{}" if isinstance(value, dict) else "()" if isinstance(value, tuple) else "[]"
    parts, used = [], 2
    for part in items:
        parts.append(part)
        used += len(part) + 2
        if used > limit:
            break
    return opener + ", ".join(parts) + closer


def example_fix(spec: Spec, label: str) -> str:
    """'e.g. tokens: 16384' for a recipe key, 'e.g. --tokens 16384' for an option."""
    if label.startswith("-"):
        value = spec.example
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, dict):
            ((kind, value),) = value.items()
            return f"e.g. --{kind.replace('_', '-')} {value}"
        return f"e.g. {label} {value}"
    return f"e.g. {label.rsplit('.', 1)[-1]}: {_yaml(spec.example)}"


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(_yaml, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# One check per kind


def _is_number(value: Any) -> bool:  # YAML `true` is a Python int: never a number here
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(spec: Spec, value: float) -> bool:
    return ((spec.min is None or value >= spec.min) and (spec.max is None or value <= spec.max)
            and (spec.above is None or value > spec.above))


def _check_int(spec: Spec, value: Any, label: str) -> int:
    # 5.0 is refused like 5.5: a float where a count belongs is a mistake, not a rounding question.
    if not _is_number(value) or not isinstance(value, int) or not _in_range(spec, value):
        raise _refuse(spec, value, label)
    return value


def _check_number(spec: Spec, value: Any, label: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or not _in_range(spec, value):
        raise _refuse(spec, value, label)
    return float(value)


def _check_bool(spec: Spec, value: Any, label: str) -> bool:
    # Only YAML booleans: "no" (quoted) is a string, and "false" or 0 would read as true to Python.
    if not isinstance(value, bool):
        unquoted = ", unquoted" if isinstance(value, str) else ""
        raise _refuse(spec, value, label, example_fix(spec, label) + unquoted)
    return value


def _check_text(spec: Spec, value: Any, label: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _refuse(spec, value, label)
    return value


def _check_list(spec: Spec, value: Any, label: str, item_ok: Callable[[Any], bool]) -> tuple:
    # A list (recipe) or the CLI's comma-separated text already split into a list.
    if not isinstance(value, (list, tuple)) or not value:
        raise _refuse(spec, value, label)
    for item in value:
        if not _is_number(item) or not item_ok(item) or not _in_range(spec, item):
            raise _refuse(spec, value, label)
    return tuple(value)


def _check_ints(spec: Spec, value: Any, label: str) -> tuple[int, ...]:
    return _check_list(spec, value, label, lambda item: isinstance(item, int))


def _check_numbers(spec: Spec, value: Any, label: str) -> tuple[float, ...]:
    return tuple(float(item) for item in _check_list(spec, value, label, math.isfinite))


def _no_such(label: str, value: str, choices, words: str) -> LPError:
    """A name that is not one of the choices: 'X 'v' does not exist (did you mean 'w'? use one of ...)'."""
    match = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    hint = f"did you mean '{match[0]}'? " if match else ""
    return LPError(f"{label} '{value}' does not exist", f"{hint}use {words}")


def _check_choice(spec: Spec, value: Any, label: str) -> str:
    if isinstance(value, str) and value not in spec.choices:
        raise _no_such(label, value, spec.choices, "one of " + ", ".join(spec.choices))
    if not isinstance(value, str):
        raise _refuse(spec, value, label)
    return value


def _check_choices(spec: Spec, value: Any, label: str) -> tuple[str, ...]:
    # A list, not a comma-separated string: the recipe's list reaches the stage as it is.
    if not isinstance(value, (list, tuple)) or not value:
        raise _refuse(spec, value, label)
    for name in value:
        if not isinstance(name, str) or name not in spec.choices:
            raise LPError(f"{label} holds {shown(name)}, which is not one of {', '.join(spec.choices)}",
                          closest(name, spec.choices) if isinstance(name, str) else example_fix(spec, label))
    return tuple(value)


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, like the Hub); '500MiB' in binary units."""
    value = size_bytes(text)
    if value is None:
        raise LPError(f"size '{text}' is not understood", "write it like 5GB, 500MB or 2GiB")
    return value


def size_bytes(text: str) -> int | None:
    """A size ('5GB' -> 5_000_000_000, '2GiB' binary) in bytes; None if it is not a positive size."""
    clean = text.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if clean.endswith(unit):
            try:
                value = float(clean[: -len(unit)].strip()) * SIZE_UNITS[unit]
            except ValueError:
                return None
            # inf (1e400GB) or nan would crash int(); they are not sizes either
            return int(value) if math.isfinite(value) and int(value) > 0 else None
    return None


def _check_size(spec: Spec, value: Any, label: str) -> str:
    if not isinstance(value, str) or size_bytes(value) is None:
        raise _refuse(spec, value, label)
    return value  # export.export takes the text


def _check_percent(spec: Spec, value: Any, label: str) -> float:
    fraction = percent_fraction(value, label, spec.example)
    if not _in_range(spec, fraction):
        raise _refuse(spec, value, label)
    return fraction


def percent_fraction(value: Any, label: str, example: str = "5%") -> float:
    """'97%' -> 0.97, the one way to write a percentage, on the command line and in a recipe alike. A bare
    number is ambiguous (0.97 reads as 97% to some, 0.97% to others) and is refused, except 0."""
    if _is_number(value) or (isinstance(value, str) and not value.strip().endswith("%")):
        number = _number_or_none(value)
        if number == 0:
            return 0.0
        if number is not None and math.isfinite(number):
            meant = f"{number * 100:g}% or {number:g}%" if 0 < abs(number) <= 1 else f"{number:g}%"
            typed = value.strip() if isinstance(value, str) else shown(value)
            raise LPError(f"{label} {typed} has no % sign, so it is ambiguous", f"write e.g. {meant}")
    text = value.strip()[:-1].strip() if isinstance(value, str) else None
    number = _number_or_none(text)
    if number is None or not math.isfinite(number):
        raise LPError(f"{label} must be a percentage like {example}, got {shown(value)}",
                      f"e.g. {label} {example}" if label.startswith("-") else f"e.g. {label.rsplit('.', 1)[-1]}: {example}")
    return number / 100


def percent_text(fraction: float) -> str:
    """0.0097 -> '0.97%', 0.25 -> '25%': exact enough that a bound never reads as another number."""
    return f"{100 * fraction:.4g}%"


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool):  # YAML `true`: not a number here
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_device(spec: Spec, value: Any, label: str) -> str:
    # Only the name is checked here; whether this machine has that device is the stage's question.
    if not isinstance(value, str):
        raise _refuse(spec, value, label)
    if not (value in DEVICES or re.fullmatch(r"cuda:\d+", value)):
        raise _no_such(label, value, DEVICES, describe(spec))
    return value


def _check_target(spec: Spec, value: Any, label: str) -> dict:
    if not isinstance(value, dict) or len(value) != 1:
        raise _refuse(spec, value, label)
    ((kind, amount),) = value.items()
    if kind not in TARGETS:
        raise LPError(f"{label} must hold exactly one of {', '.join(TARGETS)}, got {shown(kind)}",
                      closest(kind, TARGETS))
    return {kind: check_target(kind, amount, f"{label}.{kind}")}


CHECKS: dict[str, Callable[[Spec, Any, str], Any]] = {
    "int": _check_int, "ints": _check_ints, "number": _check_number, "numbers": _check_numbers,
    "bool": _check_bool, "text": _check_text,
    "choice": _check_choice, "choices": _check_choices, "size": _check_size, "percent": _check_percent,
    "device": _check_device, "target": _check_target,
}
