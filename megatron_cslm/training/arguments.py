"""Megatron-LM style flags for `pretrain` and `sft`, generated from the typed configs, with YAML presets.

Why generated: every setting is written once, as a field of a config dataclass (training/config.py,
`ParallelConfig`), with its default, type, choices and help (`argtypes.setting`). This module turns each field
into exactly one flag (plus the `--no-...` twin of a default-on switch), so the flags, `--help`, the YAML keys and
the configs cannot drift apart; a new setting is a new field, nothing here.

A YAML file given by `--config` sets defaults (keys are flag names, dashes or underscores); flags on the command
line override it. Each preset value goes through the flag's own type and choices first, so `save-interval: 0`
in a preset stops exactly as `--save-interval 0` does (exit 2), as one line naming the file, line and key,
before any process group starts.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from megatron_cslm.argtypes import flag_spec
from megatron_cslm.errors import CslmError
from megatron_cslm.training.config import CONCERNS

GROUP_TITLES = {  # concern -> --help section
    "model": "model and precision", "parallel": "parallelism", "runtime": "device and process group",
    "data": "data", "optim": "optimization", "checkpoint": "checkpointing",
    "logging": "evaluation and logging", "comm": "communication (megatron-core DDP)",
    "profiling": "profiling and timing",
}
_TYPES = {"int": int, "float": float}  # annotation -> argparse type for fields declared without `setting`


def _flags(field: dataclasses.Field) -> tuple[str, ...]:
    return flag_spec(field).get("flags") or ("--" + field.name.replace("_", "-"),)


def _default(field: dataclasses.Field):
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return list(value) if isinstance(value, tuple) else value  # argparse's nargs values are lists


def add_field_flag(group, field: dataclasses.Field) -> None:
    """The one flag of a config field (two for a default-on switch with a `negative` twin)."""
    spec = flag_spec(field)
    names, default, helptext = _flags(field), _default(field), spec.get("help", "")
    if isinstance(default, bool):
        group.add_argument(*names, dest=field.name, action="store_true", default=default, help=helptext)
        if spec.get("negative"):
            group.add_argument(spec["negative"], dest=field.name, action="store_false",
                               help=spec.get("negative_help", ""))
        return
    base = str(field.type).split("|")[0].strip()
    nargs = spec.get("nargs") or ("+" if base == "tuple" else None)
    group.add_argument(*names, dest=field.name, default=default, help=helptext, nargs=nargs,
                       type=spec.get("type") or _TYPES.get(base), choices=spec.get("choices"),
                       metavar=spec.get("metavar"))


def build_parser(description: str, sft: bool = False) -> argparse.ArgumentParser:
    """Every config field as a flag, grouped by concern; `sft` adds SFT's task flag."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of flag defaults (flag names as keys); command-line flags win")
    for name, concern in CONCERNS.items():
        group = p.add_argument_group(GROUP_TITLES.get(name, name))
        for field in dataclasses.fields(concern):
            add_field_flag(group, field)
    if sft:
        p.add_argument("--modality-loss-weights", type=float, nargs=3, default=[1.0, 1.0, 1.0],
                       metavar=("TQ", "TA", "SA"), help="loss weights of question transcript, text answer, speech")
    return p


def _yaml_lines(path: str, text: str) -> dict[str, int]:
    """Top-level key -> 1-based line of a YAML mapping (for the error message)."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


def preset_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """A YAML preset's values, typed and checked by the flags they stand for (dest -> value).

    Raises a usage CslmError naming the file, line and key: an unknown key, or a value the flag's type or
    choices refuse (the same message argparse gives for the flag on the command line)."""
    text = Path(path).read_text(encoding="utf-8")
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise CslmError(path, None, None, "expected a mapping of flag names to values", kind="usage", reason="usage")
    lines = _yaml_lines(path, text)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "config"}
    out = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        line = lines.get(str(key))
        if dest not in actions:
            raise CslmError(path, line, str(key), "is not a flag of this command", kind="usage", reason="usage")
        action = actions[dest]
        try:
            out[dest] = _typed(action, value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise CslmError(path, line, str(key), f"{e} (flag {action.option_strings[0]})",
                            kind="usage", reason="usage") from None
    return out


def _typed(action: argparse.Action, value):
    """`value` (from YAML) as the flag would have parsed it: its type on each item, then its choices."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
        return value
    items = value if isinstance(value, list) else [value]
    if action.nargs is None and isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected one value, got a list {value!r}")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise argparse.ArgumentTypeError(f"expected {action.nargs} values, got {len(items)}")
    typed = [action.type(str(v)) if action.type is not None else str(v) for v in items]
    for v in typed:
        if action.choices is not None and v not in action.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {v!r} (choose from {', '.join(repr(c) for c in action.choices)})")
    return typed if action.nargs is not None else typed[0]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags with YAML defaults from --config (typed and checked like the flags themselves)."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**preset_values(parser, pre.config))
    args = parser.parse_args(argv)
    for required in ("data_path", "train_iters"):
        if getattr(args, required) in (None, []):
            parser.error(f"--{required.replace('_', '-')} is required (flag or YAML key)")
    if args.load_init is None and args.model_arch is None and args.load is None:
        parser.error("give --load-init (a converted checkpoint), --load (a checkpoint to resume or, with "
                     "--finetune, start from) or --model-arch (train from scratch)")
    return args

