"""Transitional: moved to tests/helpers/speech.py and tests/helpers/files.py; import from there."""
from tests.helpers.files import read_jsonl, write_tsv  # noqa: F401
from tests.helpers.speech import clips, speech  # noqa: F401
