"""Speech units -> waveform with CosyVoice's flow-matching model and HiFT (HiFi-GAN + iSTFT) vocoder, streamed.

Why: CSLM's spoken answer is a unit sequence; to hear it (and to score it: ASR consistency, UTMOS) it goes
through the speech decoder of the CosyVoice release whose tokenizer made the units: units at the tokenizer's frame
rate -> 80-bin mel (conditional flow matching, conditioned on a speaker x-vector and optionally a prompt's units +
mel) -> 22.05/24 kHz audio. The modules are CosyVoice's own, from the PyPI package `cosyvoice-minicpmo` (it ships
CosyVoice's `flow/`, `hifigan/`, `transformer/` and Matcha-TTS's decoder), built from the model directory's
`cosyvoice.yaml` (or `cosyvoice2.yaml`) and loaded from its `flow.pt` and `hift.pt`, as CosyVoice's CosyVoiceModel
does. Only the `flow` and `hift` sections of the YAML are built: the LLM, text frontend and training pipeline
entries need Whisper/ModelScope/... and are not used to decode units.

Streaming (`SynthesisStream`): each pushed chunk of frame-rate units (one SA chunk, re-expanded by durations)
comes back as audio at once. The flow is conditioned on the previous chunk (its units and generated mel as the
prompt, CosyVoice's zero-shot prompt mechanism) so the voice and prosody continue across chunks, and the vocoder
re-reads the previous chunk's last mel frames and harmonic source (CosyVoice's `hift_cache`) so there is no phase
jump. Invariant: a chunk of n units yields exactly `samples_for(n)` samples (the flow's mel frames for n units x
the vocoder's samples per mel frame); the stream's audio is the concatenation of the chunks'.

Dependencies: `pip install 'megatron_cslm[synth]'` then `pip install --no-deps cosyvoice-minicpmo==0.1.0` (its
declared dependencies pull onnxruntime-gpu, openai-whisper and modelscope, none needed here, and miss diffusers and
conformer, which its flow decoder imports). Matcha-TTS's `matcha.utils` package imports Lightning, Hydra,
matplotlib and gdown only to build a logger; when they are absent, `matcha.utils.pylogger.get_pylogger` is
provided by a stand-in that returns a standard `logging` logger (nothing else of `matcha.utils` is used).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megatron_cslm.errors import CslmError

log = logging.getLogger(__name__)

PACKAGE_HINT = ("pip install 'megatron_cslm[synth]' && pip install --no-deps cosyvoice-minicpmo==0.1.0")
MODEL_HINT = ("a CosyVoice model directory (cosyvoice.yaml + flow.pt + hift.pt), e.g. CosyVoice-300M-25Hz for "
              "speech_tokenizer_v1_25hz units or CosyVoice-300M for speech_tokenizer_v1, downloaded from "
              "ModelScope iic/<name> or Hugging Face FunAudioLLM/<name>")
CONFIG_NAMES = ("cosyvoice.yaml", "cosyvoice2.yaml")
SPK_EMBED_DIM = 192  # CosyVoice's CAM++ x-vector
_TAGGED = re.compile(r"!(new|name|apply|module|copy|tuple|include):")


def _matcha_logger() -> None:
    """Make `matcha.utils.pylogger` importable without Lightning/Hydra (see module docstring)."""
    try:
        importlib.import_module("matcha.utils.pylogger")
        return
    except ModuleNotFoundError as e:
        if e.name in (None, "matcha") or e.name.startswith("matcha"):
            raise
    utils = types.ModuleType("matcha.utils")
    utils.__path__ = []  # a package with nothing else in it: any other matcha.utils import fails loudly
    pylogger = types.ModuleType("matcha.utils.pylogger")
    pylogger.get_pylogger = lambda name=__name__: logging.getLogger(name)
    utils.pylogger = pylogger
    sys.modules["matcha.utils"], sys.modules["matcha.utils.pylogger"] = utils, pylogger


def require_cosyvoice():
    """hyperpyyaml's loader, after checking that CosyVoice's modules import; else a one-line error."""
    try:
        from hyperpyyaml import load_hyperpyyaml

        importlib.import_module("cosyvoice")
        _matcha_logger()
        for name in ("cosyvoice.flow.flow", "cosyvoice.flow.flow_matching", "cosyvoice.hifigan.generator"):
            importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise CslmError(None, None, "--cosyvoice-dir", f"synthesis needs the Python module {e.name!r} "
                        f"(CosyVoice's flow and HiFT modules): {PACKAGE_HINT}", kind="usage",
                        reason="missing_package") from None
    return load_hyperpyyaml


def decoder_yaml(text: str) -> str:
    """The part of a CosyVoice YAML that builds `flow` and `hift`: those two sections and every plain top-level
    entry (numbers, strings, lists their `!ref`s point to); entries that construct or name other objects (LLM,
    text frontend, data pipeline, optimizers) are left out, so their packages need not be installed."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        key = re.match(r"^([A-Za-z_][\w]*)\s*:", line)
        if key:
            blocks.append((key.group(1), [line]))
        elif blocks:
            blocks[-1][1].append(line)
    keep = {key: lines for key, lines in blocks
            if key in ("flow", "hift") or not any(_TAGGED.search(x) for x in lines)}
    changed = True
    while changed:  # a plain entry that refers to a left-out one (`data_pipeline: [!ref <tokenize>, ...]`) goes too
        changed = False
        for key, lines in list(keep.items()):
            refs = {r for x in lines for r in re.findall(r"!ref\s*<([\w.]+)>", x)}
            if key not in ("flow", "hift") and any(r.split(".")[0] not in keep for r in refs):
                del keep[key]
                changed = True
    return "\n".join(x for lines in keep.values() for x in lines) + "\n"


@dataclass
class SpeakerPrompt:
    """Who speaks: a CosyVoice x-vector [1, 192] and optionally a prompt utterance's units [1, P] (frame rate) and
    80-bin mel [1, M, 80], as CosyVoice's `spk2info.pt` / `frontend_zero_shot` hold them."""

    embedding: torch.Tensor
    tokens: torch.Tensor
    feat: torch.Tensor

    @classmethod
    def neutral(cls) -> "SpeakerPrompt":
        return cls(torch.zeros(1, SPK_EMBED_DIM), torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, 80))

    @classmethod
    def from_file(cls, path: str | os.PathLike, speaker: str | None = None) -> "SpeakerPrompt":
        """From a CosyVoice `spk2info.pt` ({speaker: {...}}, `speaker` picks one) or a single speaker's dict, with
        keys `embedding`/`flow_embedding` and optionally `speech_token`/`flow_prompt_speech_token` and
        `speech_feat`/`prompt_speech_feat`."""
        if not Path(path).is_file():
            raise CslmError(path, None, "--speaker-prompt", "not found", reason="missing")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict):
            raise CslmError(path, None, None, f"expected a dict of speaker tensors, got {type(data).__name__}")
        if not any(k in data for k in ("embedding", "flow_embedding")):
            if speaker is None:
                if len(data) != 1:
                    raise CslmError(path, None, "--speaker", f"holds {len(data)} speakers: name one of "
                                    f"{sorted(data)[:10]}", kind="usage")
                speaker = next(iter(data))
            if speaker not in data:
                raise CslmError(path, None, "--speaker", f"no speaker {speaker!r}; it has {sorted(data)[:10]}",
                                kind="usage")
            data = data[speaker]

        def get(*names):
            return next((data[n] for n in names if n in data), None)

        emb = get("flow_embedding", "embedding")
        if emb is None or emb.numel() != SPK_EMBED_DIM:
            raise CslmError(path, None, "embedding", f"a {SPK_EMBED_DIM}-dim speaker x-vector is needed, got "
                            f"{None if emb is None else tuple(emb.shape)}")
        tokens = get("flow_prompt_speech_token", "speech_token")
        feat = get("prompt_speech_feat", "speech_feat")
        if (tokens is None) != (feat is None):
            raise CslmError(path, None, "speech_feat", "prompt units and prompt mel come together (both or none)")
        prompt = cls.neutral()
        prompt.embedding = emb.reshape(1, SPK_EMBED_DIM).float()
        if tokens is not None:
            prompt.tokens = tokens.reshape(1, -1).to(torch.int32)
            prompt.feat = feat.reshape(1, -1, 80).float()
        return prompt


class CosyVoiceSynthesizer:
    """CosyVoice's flow + HiFT vocoder; `stream()` for chunk-by-chunk synthesis, `synthesize()` for one piece."""

    def __init__(self, flow: torch.nn.Module, hift: torch.nn.Module, sample_rate: int, source: str = "",
                 device: str | torch.device = "cpu"):
        self.flow, self.hift = flow.to(device).eval(), hift.to(device).eval()
        self.sample_rate, self.source, self.device = int(sample_rate), source, torch.device(device)
        self.units_per_second = flow.input_frame_rate
        self.num_units = flow.input_embedding.num_embeddings
        self.samples_per_mel = int(round(hift.f0_upsamp.scale_factor))  # prod(upsample_rates) * istft hop
        self._causal = "finalize" in inspect.signature(flow.inference).parameters  # CosyVoice 2's flow

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                       load_weights: bool = True) -> "CosyVoiceSynthesizer":
        """Build flow and hift from the directory's YAML and load `flow.pt` / `hift.pt` (strict, as CosyVoice).
        `load_weights=False` keeps the random initialisation (tests; output is noise)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CslmError(model_dir, None, "--cosyvoice-dir", f"not a directory: give {MODEL_HINT}",
                            kind="checkpoint", reason="missing")
        config = next((model_dir / n for n in CONFIG_NAMES if (model_dir / n).is_file()), None)
        if config is None:
            raise CslmError(model_dir, None, "--cosyvoice-dir", f"has no {' or '.join(CONFIG_NAMES)}: give "
                            f"{MODEL_HINT}", kind="checkpoint", reason="missing")
        load_hyperpyyaml = require_cosyvoice()
        try:
            configs = load_hyperpyyaml(decoder_yaml(config.read_text(encoding="utf-8")))
        except Exception as e:  # noqa: BLE001 - any YAML/constructor failure is this file's problem
            raise CslmError(config, None, None, f"cannot build CosyVoice's flow/hift from it: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}", kind="checkpoint") from None
        for key in ("flow", "hift", "sample_rate"):
            if key not in configs:
                raise CslmError(config, None, key, "missing: not a CosyVoice model config", kind="checkpoint")
        flow, hift = configs["flow"], configs["hift"]
        if load_weights:
            for name, module, strip in (("flow.pt", flow, ""), ("hift.pt", hift, "generator.")):
                path = model_dir / name
                if not path.is_file():
                    raise CslmError(path, None, None, f"missing: the CosyVoice {name[:-3]} weights of {MODEL_HINT}",
                                    kind="checkpoint", reason="missing")
                state = torch.load(path, map_location="cpu", weights_only=True)
                state = {k.replace(strip, "") if strip else k: v for k, v in state.items()}
                try:
                    module.load_state_dict(state, strict=True)
                except RuntimeError as e:
                    raise CslmError(path, None, None, f"does not fit {config.name}: {str(e).splitlines()[0]}",
                                    kind="checkpoint") from None
        return cls(flow, hift, configs["sample_rate"], str(model_dir), device)

    def mel_frames_for(self, num_units: int) -> int:
        """Mel frames the flow makes for `num_units` units (CosyVoice's length regulator arithmetic)."""
        if self._causal:
            return num_units * self.flow.token_mel_ratio
        return int(num_units / self.units_per_second * 22050 / 256)

    def samples_for(self, num_units: int) -> int:
        return self.mel_frames_for(num_units) * self.samples_per_mel

    def check_units(self, units: Sequence[int]) -> None:
        bad = next((u for u in units if not 0 <= u < self.num_units), None)
        if bad is not None:
            raise CslmError.compat(f"unit {bad} is outside the CosyVoice flow's {self.num_units} units "
                                   f"({self.source})", field="units")

    def stream(self, speaker: SpeakerPrompt | None = None, context_units: int = 50) -> "SynthesisStream":
        return SynthesisStream(self, speaker or SpeakerPrompt.neutral(), context_units)

    def synthesize(self, units: Sequence[int], speaker: SpeakerPrompt | None = None) -> torch.Tensor:
        """All of `units` (frame rate) at once -> 1-D float waveform at `sample_rate`."""
        return self.stream(speaker).push(units)

    @torch.inference_mode()
    def _mel(self, units: torch.Tensor, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
             embedding: torch.Tensor) -> torch.Tensor:
        d = self.device
        kwargs = dict(token=units.to(d), token_len=torch.tensor([units.shape[1]], dtype=torch.int32, device=d),
                      prompt_token=prompt_tokens.to(d),
                      prompt_token_len=torch.tensor([prompt_tokens.shape[1]], dtype=torch.int32, device=d),
                      prompt_feat=prompt_feat.to(d),
                      prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32, device=d),
                      embedding=embedding.to(d))
        if self._causal:
            mel, _ = self.flow.inference(**kwargs, streaming=False, finalize=True)
        else:
            mel, _ = self.flow.inference(**kwargs, flow_cache=torch.zeros(1, 80, 0, 2, device=d))
        return mel.float()


class SynthesisStream:
    """Push frame-rate units chunk by chunk; each push returns that chunk's audio (see module docstring)."""

    MEL_CACHE = 8  # mel frames the vocoder re-reads from the previous chunk

    def __init__(self, synth: CosyVoiceSynthesizer, speaker: SpeakerPrompt, context_units: int = 50):
        self.synth, self.speaker, self.context_units = synth, speaker, context_units
        self._prev_units = torch.zeros(1, 0, dtype=torch.int32)
        self._prev_mel = torch.zeros(1, 0, 80)
        self._cache_mel = torch.zeros(1, 80, 0)
        self._cache_source = torch.zeros(1, 1, 0)
        self.units_in = 0
        self.samples_out = 0

    @torch.inference_mode()
    def push(self, units: Sequence[int]) -> torch.Tensor:
        units = list(units)
        if not units:
            return torch.zeros(0)
        self.synth.check_units(units)
        x = torch.tensor([units], dtype=torch.int32)
        prompt_tokens = torch.cat([self.speaker.tokens, self._prev_units], dim=1)
        prompt_feat = torch.cat([self.speaker.feat, self._prev_mel], dim=1)
        mel = self.synth._mel(x, prompt_tokens, prompt_feat, self.speaker.embedding).cpu()  # [1, 80, frames]
        # the previous chunk as the next one's prompt: its last `context_units` units and their mel frames
        keep = min(self.context_units, len(units))
        self._prev_units = x[:, len(units) - keep:]
        self._prev_mel = mel[:, :, mel.shape[2] - self.synth.mel_frames_for(keep):].transpose(1, 2)
        hop = self.synth.samples_per_mel
        mel_in = torch.cat([self._cache_mel, mel], dim=2)
        speech, source = self.synth.hift.inference(speech_feat=mel_in.to(self.synth.device),
                                                   cache_source=self._cache_source.to(self.synth.device))
        speech, source = speech.cpu(), source.cpu()
        skip = self._cache_mel.shape[2] * hop
        self._cache_mel = mel_in[:, :, -self.MEL_CACHE:]
        self._cache_source = source[:, :, -self._cache_mel.shape[2] * hop:]
        audio = speech[0, skip:skip + mel.shape[2] * hop]
        self.units_in += len(units)
        self.samples_out += audio.numel()
        return audio


def write_wav(path: str | os.PathLike, audio: torch.Tensor, sample_rate: int) -> None:
    """16-bit PCM WAV, written atomically (no audio library needed)."""
    import wave

    from megatron_cslm.fileio import atomic_path

    pcm = (audio.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    with atomic_path(path) as tmp:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(pcm)

