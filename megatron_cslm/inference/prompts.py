"""Prompt styles for spoken questions: ours (the SFT layout) and the CSLM authors' (their decode scripts).

Why both: a model answers well only when prompted exactly as it was trained. Models fine-tuned here see the
prompt `data.sft.SFTEncoder.encode_prompt` builds (our Llama-3.1 headers, no system turn). The authors'
released models were trained and are decoded by their `cslm/infer/decode_general.py` /
`decode_general_cross.py` (github.com/ictnlp/CSLM): the user turn

    {prompt} This is input: <sosp>{units}<eosp>.        (English template)
    {prompt} 这是输入: <sosp>{units}<eosp>。             (Chinese template)

rendered through the model's *own* chat template (`transformers` `apply_chat_template`, generation prompt
added), then tokenized; their sampling is temperature 1.0, top-p 0.7 (our defaults as well). Ids come from
our tokenizer on the rendered text, which equals `apply_chat_template(tokenize=True)` id for id (tested).
"""
from __future__ import annotations

import os
from typing import Sequence

from megatron_cslm.data.chunking import dedup_units
from megatron_cslm.fileio import DataError
from megatron_cslm.text.markup import render_units
from megatron_cslm.text.tokenizer import SpeechTextTokenizer

PROMPT_STYLES = ("cslm", "cslm-authors", "cslm-authors-cross")
# The authors' user-turn templates, keyed by the language their script is run with.
AUTHORS_TEMPLATES = {"en": "{prompt} This is input: {speech}.", "zh": "{prompt} 这是输入: {speech}。"}
# decode_general.py: answer in the question's language; decode_general_cross.py: answer in the language named.
AUTHORS_INSTRUCTIONS = {
    "cslm-authors": {"en": "Please directly answer the questions in the user's speech.",
                     "zh": "直接回答用户语音中的问题。"},
    "cslm-authors-cross": {"en": "Please answer the questions in the user's speech in English.",
                           "zh": "用中文回答用户语音中的问题。"},
}


class AuthorsPrompt:
    """`encode_prompt(units, lang)` as the authors' decode scripts build it (see the module docstring).

    `lang` picks the instruction and the template, as their scripts' `--lang` does (the answer language
    for the cross-lingual script). Duck-types `SFTEncoder.encode_prompt`, so the runner takes either.
    """

    def __init__(self, tok: SpeechTextTokenizer, tokenizer_dir: str | os.PathLike, style: str = "cslm-authors",
                 dedup: bool = False, system_prompt: str | None = None):
        from transformers import AutoTokenizer

        if style not in AUTHORS_INSTRUCTIONS:
            raise ValueError(f"unknown authors' prompt style {style!r}; expected one of {sorted(AUTHORS_INSTRUCTIONS)}")
        self.tok, self.style, self.dedup, self.system_prompt = tok, style, dedup, system_prompt
        self.hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if not self.hf.chat_template:
            raise DataError(tokenizer_dir, None, "chat_template",
                            f"the tokenizer has no chat template, which --prompt-style {style} renders through",
                            kind="compat", reason="incompatible")
        if len(self.hf) != tok.vocab_size:
            raise DataError(tokenizer_dir, None, "vocab_size", f"transformers reads {len(self.hf)} ids, the speech "
                            f"tokenizer {tok.vocab_size}: not the same tokenizer", kind="compat", reason="incompatible")

    def user_turn(self, units: Sequence[int], lang: str) -> str:
        """The user message of the authors' scripts for a spoken question."""
        if lang not in AUTHORS_TEMPLATES:
            raise ValueError(f"no authors' template for language {lang!r} (known: {sorted(AUTHORS_TEMPLATES)})")
        units = dedup_units(list(units)) if self.dedup else list(units)
        speech = render_units(units, self.tok.specials)
        return AUTHORS_TEMPLATES[lang].format(prompt=AUTHORS_INSTRUCTIONS[self.style][lang], speech=speech)

    def messages(self, units: Sequence[int], lang: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": self.user_turn(units, lang)}]

    def encode_prompt(self, units: Sequence[int], lang: str) -> list[int]:
        """Prompt ids: the model's chat template with the generation prompt, tokenized by our tokenizer."""
        text = self.hf.apply_chat_template(self.messages(units, lang), tokenize=False, add_generation_prompt=True)
        return self.tok.encode_text(text)
