"""Checking what a user passes to an app, in one place: each check names the option, the value and what is allowed.

Values come from Python calls, from FastEstimator's command line (`fastestimator train FILE --name value`, which turns
`True`, `3` and `[1, 2]` into Python objects with `ast.literal_eval` and leaves anything else a string) and from
`--hyperparameters FILE.json`. So a boolean may arrive as the string "true" or "false", and a number never silently
stands in for a boolean: `--overwrite no` or `--overwrite 1` is refused instead of read as True.
"""
import difflib
from typing import Any, Iterable, List, Optional, Sequence


class OptionError(ValueError):
    """An option with an unknown name, a wrong type or an out-of-range value; the message says what is allowed."""


def boolean(name: str, value: Any) -> bool:
    """True / False, or the command line's "true" / "false" in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise OptionError(f"{name} must be True or False, got {value!r}")


def positive_int(name: str, value: Any) -> int:
    """A whole number >= 1 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be a positive whole number, got {value!r}")
    return value


def whole_number(name: str, value: Any) -> int:
    """A whole number >= 0 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"{name} must be a whole number >= 0, got {value!r}")
    return value


def optional_positive_int(name: str, value: Any) -> Optional[int]:
    """None, or a whole number >= 1."""
    return None if value is None else positive_int(name, value)


def number(name: str, value: Any, low: float = 0.0, high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """A real number in [low, high] (either end open on request), as a float."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value  # NaN != NaN
    if ok:
        above = value > low if low_open else value >= low
        below = high is None or (value < high if high_open else value <= high)
        ok = above and below
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high}{')' if high_open else ']'}"
        raise OptionError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of `choices`."""
    if value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def optional_choice(name: str, value: Any, choices: Sequence[str]) -> Optional[str]:
    """None, or one of `choices`."""
    return None if value is None else choice(name, value, choices)


def int_list(name: str, value: Any, length: int) -> Optional[List[int]]:
    """None, or a list of `length` positive whole numbers (e.g. `--synthetic_size [256,64]`)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise OptionError(f"{name} must be a list of {length} positive whole numbers, e.g. [256, 64]; got {value!r}")
    return [positive_int(f"{name}[{i}]", v) for i, v in enumerate(value)]


def unknown(names: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """Refuse option names `where` does not take, suggesting the closest allowed name for each."""
    allowed = sorted(allowed)
    bad = [name for name in names if name not in allowed]
    if not bad:
        return
    hints = []
    for name in bad:
        close = difflib.get_close_matches(name, allowed, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise OptionError(f"{where} has no option {', '.join(hints)}. Its options: {', '.join(allowed)}")
