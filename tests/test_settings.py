"""Issue 24 part 2: one source for each setting.

Every training flag is generated from a config field (training/config.py, ParallelConfig); a YAML preset goes
through the same type and choices as the flag, and the configs check their own values, so a bad value stops
the same way from a preset, a flag or code, before any process group starts. In-process: no launch needed.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch.distributed as dist
import yaml

from megatron_cslm.argtypes import flag_spec
from megatron_cslm.errors import CslmError
from megatron_cslm.tool import run_tool
from megatron_cslm.training.arguments import parse_args
from megatron_cslm.training.config import CONCERNS, TASK_FLAGS, DataConfig, RunConfig
from megatron_cslm.training.pretrain import cli_main
from megatron_cslm.training.pretrain import parser as pretrain_parser
from megatron_cslm.training.sft import parser as sft_parser

FIELDS = [(name, field) for name, concern in CONCERNS.items() for field in dataclasses.fields(concern)]
REQUIRED = ["--data-path", "x", "--train-iters", "3", "--model-arch", "tiny"]


def _sample(action, field):
    """A value for `field` different from its default, as YAML would hold it."""
    if isinstance(field.default, bool):
        return not field.default
    if action.nargs is not None:
        return ["1", "2"] if action.type is None else [1, 2]
    if action.choices:
        return ([c for c in action.choices if c != action.default] or list(action.choices))[-1]
    if action.type is None:
        return "some/dir"
    return 0.5 if "float" in str(field.type) else 3


@pytest.mark.parametrize("make_parser", [pretrain_parser, sft_parser], ids=["pretrain", "sft"])
def test_every_config_field_has_exactly_one_flag(make_parser):
    parser = make_parser()
    by_dest: dict[str, list] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    for _, field in FIELDS:
        actions = by_dest.get(field.name, [])
        negative = flag_spec(field).get("negative")
        positive = [a for a in actions if negative not in a.option_strings]
        assert len(positive) == 1, (field.name, [a.option_strings for a in actions])
        assert len(actions) == 1 + bool(negative), field.name
    fields = {field.name for _, field in FIELDS}
    assert set(by_dest) - fields - {"help"} <= TASK_FLAGS, sorted(set(by_dest) - fields - {"help"} - TASK_FLAGS)


def test_a_yaml_preset_and_the_same_flag_give_the_same_typed_value(tmp_path):
    parser = pretrain_parser()
    actions = {a.dest: a for a in parser._actions}
    preset, argv = {}, []
    for _, field in FIELDS:
        if field.name in ("data_path", "train_iters", "model_arch"):
            continue
        action = actions[field.name]
        value = _sample(action, field)
        preset[field.name.replace("_", "-")] = value
        if isinstance(value, bool):
            argv += [action.option_strings[0]] if value else [flag_spec(field)["negative"]]
        else:
            argv += [action.option_strings[0], *map(str, value if isinstance(value, list) else [value])]
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    from_yaml = parse_args(pretrain_parser(), ["--config", str(path), *REQUIRED])
    from_flags = parse_args(pretrain_parser(), [*argv, *REQUIRED])
    for _, field in FIELDS:
        a, b = getattr(from_yaml, field.name), getattr(from_flags, field.name)
        assert a == b and type(a) is type(b), (field.name, a, b)
        assert a != field.default or field.name in ("data_path", "train_iters", "model_arch") \
            or len(flag_spec(field).get("choices") or ()) == 1, field.name
    assert RunConfig.from_args(from_yaml) == RunConfig.from_args(from_flags)


@pytest.mark.parametrize("key, value, message", [
    ("save-interval", 0, "expected an integer > 0, got '0'"),
    ("micro-batch-size", 0, "expected an integer > 0, got '0'"),
    ("lr-decay-style", "cosin", "invalid choice: 'cosin'"),
])
def test_bad_preset_values_stop_like_the_flag_before_any_process_group(tmp_path, capsys, key, value, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"seq-length: 64\n{key}: {value}\n")
    code = run_tool(cli_main, ["--config", str(path), "--device", "cpu", *REQUIRED])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not dist.is_initialized()
    assert err.count("\n") == 0 and err.startswith(f"error: {path}:2: field '{key}' ") and message in err, err
    with pytest.raises(SystemExit) as stopped:  # the same value as a flag: argparse, exit 2, same words
        run_tool(cli_main, [f"--{key}", str(value), "--device", "cpu", *REQUIRED])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"--{key}: {message}"):  # and a config built in code
        dataclasses.replace(_concern_of(key), **{key.replace("-", "_"): value})


def _concern_of(key: str):
    name = next(n for n, f in FIELDS if f.name == key.replace("-", "_"))
    return CONCERNS[name]()


def test_unknown_preset_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("lr: 1e-4\nmicro-bach-size: 2\n")
    with pytest.raises(CslmError, match=r"typo.yaml:2: field 'micro-bach-size' is not a flag") as e:
        parse_args(pretrain_parser(), ["--config", str(path), *REQUIRED])
    assert e.value.exit_code == 2
    assert DataConfig(micro_batch_size=2).micro_batch_size == 2
