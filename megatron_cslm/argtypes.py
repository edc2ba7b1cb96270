"""argparse types shared by every tool and by the typed training configs: numbers refused before work starts.

Why a root module: `cli/`, `training/` (flags generated from `training/config.py`), `convert/` and the configs'
own `__post_init__` checks all need the same refusals with the same wording ("expected an integer > 0, got
'0'"), and a module below them all keeps imports pointing down (nothing here imports the package).
Invariant: each type takes the flag's string and returns the typed value or raises
`argparse.ArgumentTypeError`, whose message argparse prints after the flag's name (exit 2).
"""
from __future__ import annotations

import argparse
from typing import Callable


def _number(cast: type, minimum: float, strict: bool) -> Callable[[str], int | float]:
    relation = ">" if strict else ">="
    noun = "an integer" if cast is int else "a number"

    def parse(value: str):
        try:
            number = cast(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {noun} {relation} {minimum:g}, got {value!r}") from None
        if number != number or (number <= minimum if strict else number < minimum):  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected {noun} {relation} {minimum:g}, got {value!r}")
        return number

    parse.__name__ = f"{'positive' if strict else 'non-negative'} {cast.__name__}"  # argparse names it in errors
    return parse


positive_int = _number(int, 0, strict=True)
"""argparse type: an int > 0 (sizes, counts, lengths)."""
positive_float = _number(float, 0, strict=True)
"""argparse type: a float > 0 (seconds, MiB, GB, rates)."""
nonnegative_int = _number(int, 0, strict=False)
"""argparse type: an int >= 0 (seeds, worker counts where 0 means in-process)."""
nonnegative_float = _number(float, 0, strict=False)
"""argparse type: a float >= 0."""


# ------------------------------------------------------------------ settings: one dataclass field, one flag

FLAG = "flag"  # dataclasses.field metadata key read by the flag generator (training/arguments.py)


def setting(default, help: str = "", *, type: Callable[[str], object] | None = None, choices=None,
            flags: tuple[str, ...] = (), negative: str | None = None, negative_help: str = "",
            nargs: str | int | None = None, metavar=None):
    """A typed config field that is also a command-line flag: ``lr: float = setting(6e-5, "peak LR", ...)``.

    The flag is ``--<field-name-with-dashes>`` unless `flags` names it (first = the name shown, the others
    aliases); booleans become store_true flags, and `negative` adds the flag that turns a default-on one off.
    `type` and `choices` are applied to the command line, to YAML presets and to the dataclass itself
    (`check_settings` in its `__post_init__`), so a bad value fails the same way whichever way it comes in.
    """
    import dataclasses

    spec = {"help": help, "type": type, "choices": choices, "flags": flags, "negative": negative,
            "negative_help": negative_help, "nargs": nargs, "metavar": metavar}
    return dataclasses.field(default=default, metadata={FLAG: spec})


def flag_spec(field) -> dict:
    """The flag metadata of a dataclass field ({} for a field declared without `setting`)."""
    return dict(field.metadata.get(FLAG, {}))


def flag_name(field) -> str:
    """The flag a field is set by, as `--help` and error messages show it."""
    return (flag_spec(field).get("flags") or ("--" + field.name.replace("_", "-"),))[0]


def check_value(field, value) -> None:
    """Refuse `value` for `field` as its flag would (same type function, same choices, same words).
    Raises argparse.ArgumentTypeError with the message argparse prints; None (unset) is always accepted."""
    spec = flag_spec(field)
    if value is None:
        return
    for item in (value if isinstance(value, (list, tuple)) else [value]):
        if spec.get("type") is not None and not isinstance(item, bool):
            spec["type"](str(item))
        choices = spec.get("choices")
        if choices is not None and item not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {item!r} (choose from {', '.join(repr(c) for c in choices)})")


def check_settings(config) -> None:
    """Every field of a settings dataclass against its flag's type and choices (call from `__post_init__`).
    Raises ValueError "--flag: message" (the trainer reports it as a usage error, exit 2)."""
    import dataclasses

    for field in dataclasses.fields(config):
        try:
            check_value(field, getattr(config, field.name))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{flag_name(field)}: {e}") from None
