"""The README.md model card of an exported checkpoint, written from the run itself.

Everything on the card is read from an artifact, never assumed: the base model and the stages (data sources
with token counts, hyper-parameters, command lines) from the run directory's `cslm_model.json` lineage, the
final stage's hyper-parameters from the checkpoint's saved args, the vocabulary layout and specials from the
exported tokenizer, the speech tokenizer (name, units/s, codes, weights) from the manifest's `speech_tokenizer`,
the sampling from `generation_config.json`, the licence from the notice files that travelled with the weights.
"""
from __future__ import annotations

from pathlib import Path

from megatron_cslm.checkpoint.manifest import ModelManifest


def _tokens(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "n/a"


def _stage_lines(record: dict) -> list[str]:
    stage = record.get("stage", "?")
    if stage == "convert":
        return [f"- **convert** from `{record.get('from')}`"
                + (f", vocabulary expanded with {record['num_units']} speech units and 4 specials"
                   if record.get("expand_vocab") else "")]
    hp = record.get("hyper_parameters", {})
    lines = [f"- **{stage}**: {_tokens(record.get('tokens_trained'))} tokens trained "
             f"({hp.get('train_iters')} iterations x {hp.get('global_batch_size')} sequences x "
             f"{hp.get('seq_length')} tokens); lr {hp.get('lr')} -> {hp.get('min_lr')} {hp.get('lr_decay_style')}, "
             f"weight decay {hp.get('weight_decay')}, Adam betas ({hp.get('adam_beta1')}, {hp.get('adam_beta2')}), "
             f"grad clip {hp.get('clip_grad')}"]
    for d in record.get("data", []):
        weight = f"weight {d['weight']}, " if d.get("weight") is not None else ""
        sources = ", ".join(f"{k} {_tokens(v)}" for k, v in (d.get("by_source") or {}).items())
        lines.append(f"  - `{Path(d['prefix']).name}` ({weight}{_tokens(d.get('tokens'))} tokens"
                     + (f": {sources}" if sources else "") + ")")
    if record.get("command"):
        lines.append(f"  - command: `{record['command']}`")
    return lines


def _speech_units(identity) -> str:
    """What the unit tokens are, from the manifest's speech tokenizer identity (never a default)."""
    if identity is None:
        return ("from a speech tokenizer this run did not record: ask its author which one, and at what rate, "
                "before feeding it units")
    return (f"`{identity.name}`, {identity.units_per_second:g} units/s of 16 kHz audio, {identity.num_codes} codes, "
            f"weights {identity.weights}; units of any other tokenizer or rate mean nothing to it")


def _vocabulary_line(tokenizer) -> str:
    """Where units and specials sit, as the tokenizer's own vocabulary says (any layout, not only appended)."""
    if tokenizer is None:
        return "- text-only vocabulary (no speech unit tokens)"
    specials = ", ".join(f"`{name}` = {i}" for name, i in zip(("<sosp>", "<eosp>", "[question]", "[answer]"),
                                                                tokenizer.special_ids))
    return (f"- vocabulary {tokenizer.vocab_size} ids: speech {tokenizer.layout.describe()} (token `<k>` is unit k), "
            f"specials {specials}; every other id is text")


def model_card(manifest: ModelManifest, *, final_args: dict, tokenizer, generation: dict, notices: list[str],
               export_command: str) -> str:
    """Markdown of the card. `tokenizer` is the exported SpeechTextTokenizer."""
    base = manifest.base_model or "unknown"
    arch = manifest.arch
    lines = ["---", f"base_model: {base}" if manifest.base_model else "base_model: null",
             "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [speech, speech-language-model, cross-lingual, megatron-core, cslm]", "---", "",
             f"# Cross-lingual speech language model (CSLM) from {base}", "",
             "A Llama-3.1-architecture causal LM whose vocabulary also holds discrete speech units ("
             + _speech_units(manifest.speech_tokenizer) + "), trained with megatron_cslm in the chain of modality "
             "(`[question] TQ [answer] TA1 SA1 TA2 SA2 ...`). It loads with `AutoModelForCausalLM` and "
             "`AutoTokenizer`; no custom code.", "",
             "## Model", "",
             f"- {arch.num_layers} layers, hidden {arch.hidden_size}, FFN {arch.ffn_hidden_size}, "
             f"{arch.num_attention_heads} heads ({arch.num_query_groups} KV groups), RoPE theta {arch.rope_theta}"
             + (f", RoPE scaling {arch.rope_scaling.get('rope_type', arch.rope_scaling.get('type'))}"
                if arch.rope_scaling else ""),
             _vocabulary_line(tokenizer), "",
             "## Training", "", f"Base model: `{base}`.", ""]
    for record in manifest.lineage:
        lines += _stage_lines(record)
    if final_args:
        keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                "global_batch_size", "seq_length", "lr", "min_lr", "train_iters", "seed")
        lines += ["", "Final stage settings (from the checkpoint's saved arguments): "
                  + ", ".join(f"{k}={final_args[k]}" for k in keys if k in final_args) + "."]
    lines += ["", "## Use", "",
              "Speech goes in and comes out as units wrapped in `<sosp>` ... `<eosp>`. Decode answers with the "
              "intended sampling (`generation_config.json`: "
              + ", ".join(f"{k}={v}" for k, v in generation.items() if k in ("do_sample", "temperature", "top_p"))
              + ") and turn the unit spans into audio with CosyVoice's flow-matching decoder and vocoder.", "",
              "```bash",
              "python tools/decode.py --model-name-or-path . --unit questions_units.txt --lang zh --answer-lang en "
              "--output-dir out --stream",
              "```", "",
              "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForCausalLM.from_pretrained(PATH, torch_dtype='auto')",
              "```", "",
              f"Exported with `{export_command}`.", "",
              "## Licence", ""]
    if notices:
        lines.append("This model is derived from the base model and is distributed under its terms: see "
                     + ", ".join(f"[{n}]({n})" for n in notices) + ".")
    else:
        lines.append("The source checkpoint carried no licence file; check the base model's terms before "
                     "redistributing.")
    return "\n".join(lines) + "\n"
