"""Issue 8: the quickstart runs end to end (shortened: a few steps per stage) and re-running reuses stages."""
import json
import os
import subprocess

import pytest

from tests.helpers.launch import NOISE, ROOT


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_quickstart_runs_every_stage_and_reuses_them(tmp_path):
    env = {**os.environ, "QUICK": "1", "RUN": str(tmp_path)}
    first = subprocess.run(["bash", "examples/quickstart_cpu.sh"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=850)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for stage in range(1, 14):
        assert f"=== [{stage}/13]" in first.stdout
    assert "=== quickstart summary" in first.stdout and "pretraining loss" in first.stdout
    for noise in NOISE:  # issue 12: CPU runs are quiet by default
        assert noise not in first.stdout + first.stderr, noise
    for path in ("base_hf/model.safetensors", "base/tokenizer/cslm_tokenizer.json", "bin/asr.bin",
                 "bin/asr_lossmask.idx", "bin/replay_lossmask.idx", "pretrain_read/cslm_model.json",
                 "pretrain/cslm_model.json", "sft_data/qa.bin", "sft_data/repeat.bin",
                 "sft/latest_checkpointed_iteration.txt", "hf/config.json", "decode/responses.json",
                 "decode/speech_units.txt", "heldout/heldout.json"):
        assert (tmp_path / path).exists(), path
    record = json.loads((tmp_path / "decode" / "decode.jsonl").read_text().splitlines()[0])
    assert record["chunks"], record
    vocab = json.loads((tmp_path / "base" / "tokenizer" / "cslm_tokenizer.json").read_text())["vocab_size"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == vocab  # padding stripped

    again = subprocess.run(["bash", "examples/quickstart_cpu.sh"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "iteration" not in again.stdout.split("=== [11/13]")[0]  # no training step ran again
    assert "toy base LM" not in again.stdout
    held = json.loads((tmp_path / "heldout" / "heldout.json").read_text())
    assert held["summary"]["items"] == 16 and "held-out spoken questions (never trained on): 16" in again.stdout


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not os.environ.get("CSLM_FULL_QUICKSTART"), reason="the full quickstart takes minutes: set "
                    "CSLM_FULL_QUICKSTART=1 (the QUICK=1 run above cannot learn enough to bound the error)")
@pytest.mark.timeout(1800)
def test_full_quickstart_learns_heldout_questions(tmp_path):
    """Issue 25: after the full schedule the model transcribes spoken questions it never heard."""
    done = subprocess.run(["bash", "examples/quickstart_cpu.sh"], cwd=ROOT, env={**os.environ, "RUN": str(tmp_path)},
                          capture_output=True, text=True, timeout=1750)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    held = json.loads((tmp_path / "heldout" / "heldout.json").read_text())["summary"]
    assert "TQ character error rate" in done.stdout
    assert held["tq_cer"] <= 0.10, held
