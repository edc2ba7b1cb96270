"""Training and held-out evaluation of the duration predictor (speech/duration_model.py).

Why its own module: `cslm train-duration` and the tests train the same way. Training data are units records as
`tokenize-speech --dedup` writes them (`units` deduplicated + `durations`, run lengths in frames) or raw frame-rate
`units` without `durations` (e.g. the toy corpus manifest, or `tokenize-speech` without --dedup), whose runs are
merged here with the one definition of a run (speech/runs.py).

Invariants:
- Resumable and deterministic: the batch of step s is drawn from `Random(f"{seed}|{s}")`, independent of earlier
  steps, and model + optimizer + step + RNG states are saved together, so stopping after step k and resuming
  gives the weights of an uninterrupted run (bitwise on CPU).
- The held-out split is a hash of each record's id (stable across runs, file orders and resumes).
- Records of two speech tokenizers are refused (speech/identity.py); the unit count comes from the identity, else
  from the caller (`--num-units`), and every unit is checked against it.
"""
from __future__ import annotations

import logging
import os
import random
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import SkipCounter, atomic_path, iter_jsonl, require
from megatron_cslm.speech.duration_model import (
    CONFIG_NAME,
    DurationConfig,
    DurationPredictor,
    integer_durations,
    means,
    medians,
    read_config,
    save_predictor,
)
from megatron_cslm.speech.identity import IDENTITY_KEY, SpeechTokenizerId, common_identity, parse_identity, warn_legacy
from megatron_cslm.speech.runs import unit_runs

log = logging.getLogger(__name__)

STATE_NAME = "duration_train_state.pt"


@dataclass
class DurationExample:
    id: str
    units: list[int]  # deduplicated
    durations: list[int]  # frames per unit, >= 1
    speaker: str | None


def parse_example(rec: dict, path: str | os.PathLike, line: int) -> DurationExample:
    """One record -> deduplicated units and run lengths; `durations` are checked against `units`/`num_frames`."""
    units = require(rec, "units", list, path, line)
    if not all(isinstance(u, int) and not isinstance(u, bool) for u in units):
        raise CslmError(path, line, "units", "must be a list of integer unit ids")
    durations = rec.get("durations")
    if durations is None:
        units, durations = unit_runs(units)
    elif (not isinstance(durations, list) or len(durations) != len(units)
          or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in durations)):
        raise CslmError(path, line, "durations", f"must be {len(units)} positive ints, one run length per unit")
    frames = rec.get("num_frames")
    if isinstance(frames, int) and "durations" in rec and sum(durations) != frames:
        raise CslmError(path, line, "durations", f"add up to {sum(durations)} frames but num_frames is {frames}")
    speaker = rec.get("speaker")
    return DurationExample(str(rec.get("id", f"{path}:{line}")), units, durations,
                           None if speaker is None else str(speaker))


def read_examples(paths: Iterable[str | os.PathLike], skip_bad: bool = False,
                  ) -> tuple[list[DurationExample], SpeechTokenizerId | None, SkipCounter]:
    """All usable records of `paths`, the speech tokenizer they share (None if none records one) and the counts.

    Records without units are skipped (reason ``empty``); with `skip_bad` (--skip-bad-records) bad records too.
    """
    counter = SkipCounter()
    examples, identities, legacy = [], [], []
    for path in paths:
        for line, rec in iter_jsonl(path, counter if skip_bad else None):
            counter.read += 1
            try:
                ident = parse_identity(rec.get(IDENTITY_KEY), path)
                ex = parse_example(rec, path, line)
            except CslmError as e:
                if not skip_bad:
                    raise (e.located(path, line) if e.line is None else e) from None
                counter.skip(e.reason, str(e))
                continue
            if not ex.units:
                counter.skip("empty", f"{path}:{line}: no units")
                continue
            if ident is None:
                legacy.append(str(path))
            identities.append((f"{path}:{line}", ident))
            examples.append(ex)
            counter.written += 1
    identity = common_identity(identities)
    if identity is not None and legacy:
        raise CslmError(legacy[0], None, IDENTITY_KEY, f"records without a speech tokenizer next to records of "
                        f"{identity.describe()}: tokenize them with the same tokenizer", kind="compat")
    if identity is None and examples:
        warn_legacy(", ".join(sorted(set(legacy))))
    return examples, identity, counter


def split_heldout(examples: Sequence[DurationExample], fraction: float) -> tuple[list, list]:
    """(train, held-out): a record is held out when the hash of its id falls in the first `fraction`."""
    cut = int(round(fraction * 10_000))
    held = [e for e in examples if zlib.crc32(e.id.encode("utf-8")) % 10_000 < cut]
    train = [e for e in examples if zlib.crc32(e.id.encode("utf-8")) % 10_000 >= cut]
    return train, held


def _batch(examples: Sequence[DurationExample], config: DurationConfig, hide_speaker: Sequence[bool] | None = None,
           device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    length = max(len(e.units) for e in examples)
    units = torch.zeros(len(examples), length, dtype=torch.long)
    target = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.units)
        units[i, :n] = torch.tensor(e.units)
        target[i, :n] = torch.tensor(e.durations).clamp(1, config.max_duration) - 1
        mask[i, :n] = True
    speaker = torch.tensor([0 if hide_speaker and hide_speaker[i] else config.speaker_index(e.speaker)
                            for i, e in enumerate(examples)])
    return units.to(device), speaker.to(device), mask.to(device), target.to(device)


@torch.no_grad()
def evaluate(model: DurationPredictor, examples: Sequence[DurationExample], batch_size: int = 64) -> dict:
    """Held-out errors against the true run lengths, in frames.

    - ``mae_frames``: mean |median prediction - true| per unit (the per-unit point estimate);
    - ``total_length_error``: mean over utterances of |predicted - true length| / true length, predicted with the
      accumulated means (`integer_durations`, what expansion before synthesis uses);
    - ``mae_frames_expansion``: per-unit error of those expansion durations; ``total_length_error_median``: the
      utterance length from medians. Both for comparison.
    """
    if not examples:
        return {}
    model.eval()
    device = model.head.weight.device
    abs_med = abs_exp = units = 0
    len_err_exp, len_err_med = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        x, spk, mask, _ = _batch(chunk, model.config, device=device)
        probs = torch.softmax(model(x, spk, mask).float(), dim=-1).cpu()
        med, mean = medians(probs), means(probs)
        for i, e in enumerate(chunk):
            n, true = len(e.units), e.durations
            m = med[i, :n].tolist()
            x_dur = integer_durations(mean[i, :n].tolist())
            abs_med += sum(abs(a - b) for a, b in zip(m, true))
            abs_exp += sum(abs(a - b) for a, b in zip(x_dur, true))
            units += n
            len_err_exp.append(abs(sum(x_dur) - sum(true)) / sum(true))
            len_err_med.append(abs(sum(m) - sum(true)) / sum(true))
    return {"utterances": len(examples), "units": units, "mae_frames": abs_med / units,
            "total_length_error": sum(len_err_exp) / len(examples), "mae_frames_expansion": abs_exp / units,
            "total_length_error_median": sum(len_err_med) / len(examples)}


@dataclass
class TrainSettings:
    train_iters: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    speaker_dropout: float = 0.1  # share of utterances trained with the speaker hidden (index 0)
    save_interval: int = 0  # 0: save at the end only
    log_interval: int = 50
    device: str = "cpu"


def _config_key(config: DurationConfig) -> dict:
    return asdict(config)


def train_duration(train: Sequence[DurationExample], config: DurationConfig, settings: TrainSettings,
                   save: str | os.PathLike | None = None, heldout: Sequence[DurationExample] = (),
                   stop_after: int | None = None) -> tuple[DurationPredictor, dict]:
    """Train (or resume from `save`) to `settings.train_iters` steps; returns the model and held-out metrics.

    `stop_after` ends the run after that step with a save, as a preempted job would (tests of resume).
    """
    if not train:
        raise CslmError(None, None, "--input", "no training records (all held out, empty or skipped)", kind="usage")
    torch.manual_seed(settings.seed)
    model = DurationPredictor(config).to(settings.device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    start = 0
    state_path = Path(save) / STATE_NAME if save else None
    if state_path is not None and state_path.is_file():
        start = _resume(model, opt, Path(save), config)
        log.info("resumed the duration predictor from %s at step %d", save, start)
    model.train()
    for step in range(start + 1, settings.train_iters + 1):
        rng = random.Random(f"{settings.seed}|{step}")
        idx = rng.sample(range(len(train)), min(settings.batch_size, len(train)))
        hide = [rng.random() < settings.speaker_dropout for _ in idx]
        x, spk, mask, target = _batch([train[i] for i in idx], config, hide, settings.device)
        logits = model(x, spk, mask)
        loss = F.cross_entropy(logits[mask], target[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if settings.log_interval and step % settings.log_interval == 0:
            log.info("step %d/%d: loss %.4f", step, settings.train_iters, loss.item())
        last = step == settings.train_iters or step == stop_after
        if save and (last or (settings.save_interval and step % settings.save_interval == 0)):
            metrics = evaluate(model, heldout) if last else {}
            model.train()
            _save(model, opt, Path(save), step, metrics)
        if step == stop_after:
            break
    metrics = evaluate(model, heldout)
    return model.eval(), metrics


def _save(model: DurationPredictor, opt: torch.optim.Optimizer, out: Path, step: int, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / STATE_NAME) as tmp:
        torch.save({"step": step, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(), "config": _config_key(model.config)}, tmp)
    save_predictor(out, model, {"step": step, "heldout": metrics})


def _resume(model: DurationPredictor, opt: torch.optim.Optimizer, out: Path, config: DurationConfig) -> int:
    from safetensors.torch import load_file

    from megatron_cslm.speech.duration_model import WEIGHTS_NAME

    saved_config, extra = read_config(out)
    state = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True)
    old, new = _config_key(saved_config), _config_key(config)
    if old != new or state.get("config") != new:
        diff = sorted(k for k, v in new.items() if old.get(k) != v)
        raise CslmError(out / CONFIG_NAME, None, diff[0] if diff else "config",
                        f"the saved predictor differs from this run's ({', '.join(diff)}: saved "
                        f"{[old[k] for k in diff]}, now {[new[k] for k in diff]}); train into a new directory",
                        kind="compat")
    if state["step"] != extra.get("step"):
        raise CslmError(out / STATE_NAME, None, "step", f"step {state['step']} but {CONFIG_NAME} has step "
                        f"{extra.get('step')}: an interrupted save; delete the directory", kind="checkpoint")
    model.load_state_dict(load_file(str(out / WEIGHTS_NAME)))
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"])


def build_config(examples: Sequence[DurationExample], identity: SpeechTokenizerId | None, num_units: int | None,
                 **sizes) -> DurationConfig:
    """The predictor's config for these records: units from the identity (else `num_units`), speakers seen."""
    if identity is not None:
        if num_units is not None and num_units != identity.num_codes:
            raise CslmError.compat(f"--num-units {num_units} but the records' speech tokenizer has "
                                   f"{identity.num_codes} codes ({identity.describe()})", field="--num-units")
        num_units = identity.num_codes
    if num_units is None:
        raise CslmError.usage("the records name no speech tokenizer: give --num-units", "--num-units")
    for e in examples:
        bad = next((u for u in e.units if not 0 <= u < num_units), None)
        if bad is not None:
            raise CslmError(None, None, "units", f"record {e.id!r} has unit {bad}, outside [0, {num_units})")
    speakers = sorted({e.speaker for e in examples if e.speaker is not None})
    return DurationConfig(num_units=num_units, speakers=speakers,
                          speech_tokenizer=identity.to_dict() if identity else None, **sizes)
