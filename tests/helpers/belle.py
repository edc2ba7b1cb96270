"""The authors' BELLE-eval-S2S audio, used only when the environment variable BELLE_EVAL_S2S names its folder
(`test.tsv` + `wav/`); otherwise the tests write their own spoken questions."""
from __future__ import annotations

import os
from pathlib import Path

BELLE_ENV = "BELLE_EVAL_S2S"


def belle_dir() -> Path | None:
    """The authors' BELLE-eval-S2S folder when BELLE_EVAL_S2S names one (opt-in), else None.

    A name that does not hold `test.tsv` and `wav/` is an error, not a reason to skip: whoever set the
    variable wants those tests to run.
    """
    value = os.environ.get(BELLE_ENV, "").strip()
    if not value:
        return None
    path = Path(value)
    if not (path / "test.tsv").is_file() or not (path / "wav").is_dir():
        raise FileNotFoundError(f"{BELLE_ENV}={value}: expected the BELLE-eval-S2S layout there (test.tsv and "
                                f"wav/<id>.wav); unset {BELLE_ENV} to run the tests on audio they write themselves")
    return path


# Part of the authors' BELLE-eval-S2S benchmark (opt-in through BELLE_EVAL_S2S), or None.
BELLE_DIR = belle_dir()
