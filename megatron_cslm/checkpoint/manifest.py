"""`cslm_model.json`: what a megatron-core checkpoint directory holds, for training and for export.

A `torch_dist` checkpoint stores tensors, not the architecture. The run directory therefore carries

    <run>/cslm_model.json                 this manifest (LlamaArch, padded vocab, tokenizer location)
    <run>/tokenizer/                      the tokenizer the vocabulary was built with
    <run>/iter_0000000/                   the checkpoint (Megatron-LM layout)
    <run>/latest_checkpointed_iteration.txt

`padded_vocab_size` is part of the checkpoint's tensor shapes: a model that loads it must be built with
this size (it is a multiple of 128 x the TP it was converted for, so it also splits at every smaller TP
that divides it), not with the size its own TP would pad to.

`speech_tokenizer` (speech/identity.py) names the codebook the model's unit tokens mean: training records its
data's, the HF conversion records `--speech-tokenizer`'s, and decode / eval / a later training stage refuse another.
null: not known (a converted text model, a foreign checkpoint); a manifest without the key predates identities.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_cslm.checkpoint.save_load import TRACKER, latest_iteration
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, write_json
from megatron_cslm.models.llama import LlamaArch
from megatron_cslm.speech.identity import IDENTITY_KEY, SpeechTokenizerId, parse_identity, warn_legacy

MANIFEST = "cslm_model.json"


@dataclass(frozen=True)
class ModelManifest:
    arch: LlamaArch  # vocab_size: the unpadded vocabulary (text + speech units + specials when expanded)
    padded_vocab_size: int
    tokenizer: str = "tokenizer"  # relative to the manifest's directory (or absolute); holds the unit count too
    base_model: str | None = None  # the HF checkpoint the run descends from (its directory name)
    # what built the weights, oldest first: {"stage": "convert"|"pretrain"|"sft", "save", "data": [...], ...};
    # travels from run to run so an export's model card can list every stage
    lineage: tuple = ()
    speech_tokenizer: SpeechTokenizerId | None = None  # the codebook of the unit tokens (None: not recorded)

    def save(self, run_dir: str | Path) -> None:
        write_json(Path(run_dir) / MANIFEST, {
            "format": 1, "arch": self.arch.to_dict(), "padded_vocab_size": self.padded_vocab_size,
            "tokenizer": self.tokenizer, "base_model": self.base_model, "lineage": list(self.lineage),
            IDENTITY_KEY: self.speech_tokenizer.to_dict() if self.speech_tokenizer else None})

    @classmethod
    def load(cls, run_dir: str | Path) -> "ModelManifest":
        path = Path(run_dir) / MANIFEST
        if not path.exists():
            raise CslmError(path, None, None, f"not found: a converted or trained run directory has a {MANIFEST} "
                            "next to its iter_* checkpoints (written by hf_to_megatron)", kind="checkpoint",
                            reason="missing")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"malformed JSON: {e.msg}") from e
        for key in ("arch", "padded_vocab_size"):
            if key not in d:
                raise DataError(path, None, key, "missing")
        try:
            arch = LlamaArch.from_dict(d["arch"])
        except (TypeError, ValueError) as e:
            raise DataError(path, None, "arch", str(e)) from e
        if d["padded_vocab_size"] < arch.vocab_size:
            raise DataError(path, None, "padded_vocab_size", f"{d['padded_vocab_size']} < vocab_size {arch.vocab_size}")
        if IDENTITY_KEY not in d:
            warn_legacy(path)
        return cls(arch, d["padded_vocab_size"], d.get("tokenizer", "tokenizer"), d.get("base_model"),
                   tuple(d.get("lineage") or ()), parse_identity(d.get(IDENTITY_KEY), path))

    def tokenizer_dir(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / self.tokenizer


# Licence and notice files of the source checkpoint (Llama 3.1: LICENSE and USE_POLICY.md); its licence asks
# them to travel with derived models, so they go HF -> run directory -> every later run -> the export.
NOTICE_PATTERNS = ("LICENSE*", "LICENCE*", "USE_POLICY*", "NOTICE*", "COPYING*", "Notice*", "ACCEPTABLE_USE*")


def notice_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    found = {p for pattern in NOTICE_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return sorted(found)


def copy_notices(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the licence/notice files of `src` into `dst` (same names); returns the names copied."""
    import shutil

    names = []
    for path in notice_files(src):
        target = Path(dst) / path.name
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
        names.append(path.name)
    return names


def resolve_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(run directory, iteration) for a run directory (latest iteration) or one of its `iter_*` directories."""
    path = Path(path)
    if (path / TRACKER).exists():
        return path, latest_iteration(path)
    if path.name.startswith("iter_") and (path / "metadata.json").exists():
        try:
            return path.parent, int(path.name[len("iter_"):])
        except ValueError:
            pass
    raise CslmError(path, None, None, f"expected a run directory with {TRACKER} or an iter_XXXXXXX checkpoint "
                    "directory with metadata.json", kind="checkpoint", reason="missing")


def read_common_state(run_dir: str | Path, iteration: int) -> dict:
    """The run's own common state of a checkpoint (iteration, consumed samples, args, LR schedule) without
    loading any tensor: cheap, so compatibility is checked before the model is built."""
    from megatron.core import dist_checkpointing

    from megatron_cslm.checkpoint.save_load import iteration_dir

    return dist_checkpointing.load_common_state_dict(str(iteration_dir(run_dir, iteration))).get("cslm", {})


def megatron_lm_manifest(run_dir: str | Path, tokenizer_dir: str | Path | None = None) -> ModelManifest:
    """The manifest of a checkpoint saved by Megatron-LM itself (no cslm_model.json): the architecture from
    the `args` it keeps in its common state, the unpadded vocabulary from the tokenizer (`tokenizer_dir`, else
    the checkpoint's own --tokenizer-model). Refuses what is not a Llama-style GPT (RMSNorm, SwiGLU, RoPE, no
    biases), naming the argument."""
    from megatron.core import dist_checkpointing

    from megatron_cslm.checkpoint.save_load import iteration_dir
    from megatron_cslm.models.llama import LLAMA3_ROPE_SCALING

    run_dir = Path(run_dir)
    iteration = latest_iteration(run_dir)
    if iteration is None:
        raise CslmError(run_dir, None, None, f"has neither {MANIFEST} nor {TRACKER}: not a checkpoint directory",
                        kind="checkpoint", reason="missing")
    path = iteration_dir(run_dir, iteration)
    args = dist_checkpointing.load_common_state_dict(str(path)).get("args")
    if args is None:
        raise CslmError(run_dir / MANIFEST, None, None, "not found, and the checkpoint's common state has no "
                        "Megatron-LM args to read the architecture from", kind="checkpoint", reason="missing")
    get = vars(args).get
    expected = {"normalization": "RMSNorm", "swiglu": True, "position_embedding_type": "rope",
                "add_bias_linear": False}
    for name, value in expected.items():
        if get(name, value) != value:
            raise CslmError(path / "common.pt", None, f"args.{name}", f"is {get(name)!r}; a Llama model has "
                            f"{value!r}", kind="checkpoint", reason="unsupported")
    tokenizer = Path(tokenizer_dir or get("tokenizer_model") or "")
    if not tokenizer_dir and not get("tokenizer_model"):
        raise CslmError(path / "common.pt", None, "args.tokenizer_model", "is not set; pass --tokenizer-model",
                        kind="checkpoint", reason="missing")
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    vocab_size = SpeechTextTokenizer.from_pretrained(tokenizer).vocab_size
    scaling = {**LLAMA3_ROPE_SCALING, "factor": float(get("rope_scaling_factor", 8.0))} \
        if get("use_rope_scaling") else None
    heads = get("num_attention_heads")
    arch = LlamaArch(num_layers=get("num_layers"), hidden_size=get("hidden_size"),
                     ffn_hidden_size=get("ffn_hidden_size"), num_attention_heads=heads,
                     num_query_groups=get("num_query_groups") if get("group_query_attention") else heads,
                     vocab_size=vocab_size, max_position_embeddings=get("max_position_embeddings"),
                     rope_theta=float(get("rotary_base", 10000)), rope_scaling=scaling,
                     norm_eps=float(get("norm_epsilon", 1e-5)),
                     tie_word_embeddings=not get("untie_embeddings_and_output_weights", False),
                     kv_channels=get("kv_channels"))
    padded = int(get("padded_vocab_size") or vocab_size)
    if padded < vocab_size:
        raise CslmError(path / "common.pt", None, "args.padded_vocab_size", f"{padded} < the tokenizer's "
                        f"{vocab_size} ids ({tokenizer})", kind="checkpoint", reason="mismatch")
    return ModelManifest(arch, padded, str(tokenizer.resolve()), base_model=run_dir.resolve().name,
                         lineage=({"stage": "megatron-lm", "from": str(run_dir.resolve()), "iteration": iteration},))


def load_any_manifest(run_dir: str | Path, tokenizer_dir: str | Path | None = None) -> ModelManifest:
    """Ours (cslm_model.json) when present, else a Megatron-LM checkpoint's (architecture from its args)."""
    if (Path(run_dir) / MANIFEST).exists():
        return ModelManifest.load(run_dir)
    return megatron_lm_manifest(run_dir, tokenizer_dir)
