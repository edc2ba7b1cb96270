"""Transitional: moved to tests/helpers/toy.py; import from there."""
from tests.helpers.toy import TOY_UNITS, build_toy_pretrain, build_toy_sft  # noqa: F401
