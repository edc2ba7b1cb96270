"""Prompt wording templates for the pretraining recipes, in English and Chinese, overridable from a file.

Varied wording keeps the model from tying a task to one fixed phrase. A template is a string with
placeholders: ``{speech}`` becomes a speech-unit segment, the others text (``{text}`` the transcript;
``{src}``/``{tgt}`` the source/target sentences; ``{src_lang}``/``{tgt_lang}`` language names in the template's
own language). The target placeholder must come last, so the document teaches the source -> target direction.
Literal braces are written ``{{`` and ``}}``.

A YAML or JSON override file has the shape of `DEFAULT_TEMPLATES` plus an optional ``lang_names``; each list it
gives replaces the default list for that recipe and language::

    asr:
      en: ["{speech}\\nTranscript: {text}"]
    lang_names:
      en: {en: English, zh: Chinese}
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from megatron_cslm.fileio import DataError

# recipe -> (allowed placeholders, required placeholders, target placeholder)
FIELDS: dict[str, tuple[frozenset[str], frozenset[str], str]] = {
    "asr": (frozenset({"speech", "text"}), frozenset({"speech", "text"}), "text"),
    "tts": (frozenset({"speech", "text"}), frozenset({"speech", "text"}), "speech"),
    "translate": (frozenset({"src", "tgt", "src_lang", "tgt_lang"}), frozenset({"src", "tgt"}), "tgt"),
    "cross_speech": (frozenset({"speech", "src", "tgt", "src_lang", "tgt_lang"}), frozenset({"speech", "tgt"}),
                     "tgt"),
}

DEFAULT_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "asr": {
        "en": ["{speech}\nTranscript: {text}",
               "Transcribe the following speech.\n{speech}\n{text}",
               "Speech: {speech}\nText: {text}",
               "What is said in this recording? {speech}\nAnswer: {text}",
               "Listen and write down what you hear: {speech}\n{text}"],
        "zh": ["{speech}\n转写：{text}",
               "请将下面的语音转写成文字。\n{speech}\n{text}",
               "语音：{speech}\n文本：{text}",
               "这段录音说了什么？{speech}\n回答：{text}",
               "听下面的语音并写出内容：{speech}\n{text}"],
    },
    "tts": {
        "en": ["{text}\nSpeech: {speech}",
               "Read the following text aloud.\n{text}\n{speech}",
               "Text: {text}\nSpeech: {speech}",
               "Say this: {text}\n{speech}",
               "Convert the text to speech: {text}\n{speech}"],
        "zh": ["{text}\n语音：{speech}",
               "请朗读下面的文字。\n{text}\n{speech}",
               "文本：{text}\n语音：{speech}",
               "请说：{text}\n{speech}",
               "把文字转换成语音：{text}\n{speech}"],
    },
    "translate": {
        "en": ["Translate the following {src_lang} text into {tgt_lang}.\n{src}\n{tgt}",
               "{src_lang}: {src}\n{tgt_lang}: {tgt}",
               "Translate to {tgt_lang}: {src}\n{tgt}",
               "What is \"{src}\" in {tgt_lang}?\n{tgt}"],
        "zh": ["把下面的{src_lang}翻译成{tgt_lang}。\n{src}\n{tgt}",
               "{src_lang}：{src}\n{tgt_lang}：{tgt}",
               "翻译成{tgt_lang}：{src}\n{tgt}",
               "“{src}”用{tgt_lang}怎么说？\n{tgt}"],
    },
    # Speech in one language -> text in the other; the templates with {src} go through the transcript
    # (the text bridge: speech -> same-language text -> translation).
    "cross_speech": {
        "en": ["Translate the {src_lang} speech into {tgt_lang} text.\n{speech}\n{tgt}",
               "{speech}\n{tgt_lang} translation: {tgt}",
               "Listen and translate into {tgt_lang}: {speech}\n{tgt}",
               "{speech}\nTranscript: {src}\n{tgt_lang} translation: {tgt}",
               "Transcribe the speech, then translate it into {tgt_lang}.\n{speech}\n{src}\n{tgt}"],
        "zh": ["把下面的{src_lang}语音翻译成{tgt_lang}文字。\n{speech}\n{tgt}",
               "{speech}\n{tgt_lang}翻译：{tgt}",
               "听语音并翻译成{tgt_lang}：{speech}\n{tgt}",
               "{speech}\n转写：{src}\n{tgt_lang}翻译：{tgt}",
               "先转写语音，再翻译成{tgt_lang}。\n{speech}\n{src}\n{tgt}"],
    },
}

# Language names as written inside templates of each language: DEFAULT_LANG_NAMES[template_lang][code].
DEFAULT_LANG_NAMES: dict[str, dict[str, str]] = {
    "en": {"en": "English", "zh": "Chinese"},
    "zh": {"en": "英文", "zh": "中文"},
}


def placeholders(template: str) -> list[str]:
    """Placeholder names of `template` in order of appearance."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def check_template(recipe: str, template: str) -> None:
    """Raise ValueError unless `template` is a well-formed template for `recipe` (see module docstring)."""
    allowed, required, target = FIELDS[recipe]
    try:
        names = placeholders(template)
    except ValueError as e:
        raise ValueError(f"malformed template {template!r}: {e} (write literal braces as {{{{ and }}}})") from None
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise ValueError(f"unknown placeholder(s) {unknown} in {template!r}; {recipe} allows {sorted(allowed)}")
    for name in sorted(required):
        if names.count(name) != 1:
            raise ValueError(f"{template!r} must contain {{{name}}} exactly once")
    if names[-1] != target:
        raise ValueError(f"{template!r}: the target {{{target}}} must be the last placeholder")


def render(template: str, values: dict) -> list[dict]:
    """Fill `template`: ``{speech}`` becomes a ``{"units": [...]}`` segment, everything else text segments
    (adjacent text merged, empty text dropped)."""
    segments: list[dict] = []
    text = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        text += literal
        if name == "speech":
            if text:
                segments.append({"text": text})
            segments.append({"units": list(values["speech"])})
            text = ""
        elif name is not None:
            text += values[name]
    if text:
        segments.append({"text": text})
    return segments


@dataclass(frozen=True)
class Templates:
    """Template lists per recipe and language, and language names per template language."""

    templates: dict[str, dict[str, tuple[str, ...]]]
    lang_names: dict[str, dict[str, str]]

    @classmethod
    def default(cls) -> "Templates":
        return cls({r: {lang: tuple(ts) for lang, ts in by_lang.items()} for r, by_lang in DEFAULT_TEMPLATES.items()},
                   {k: dict(v) for k, v in DEFAULT_LANG_NAMES.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> "Templates":
        """Defaults overridden by a YAML (.yaml/.yml) or JSON file; errors name the file and entry."""
        import yaml

        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            spec = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise DataError(path, None, None, f"cannot parse templates: {e}") from None
        if not isinstance(spec, dict):
            raise DataError(path, None, None, "expected a mapping of recipe -> language -> list of templates")
        base = cls.default()
        templates = dict(base.templates)
        lang_names = {k: dict(v) for k, v in base.lang_names.items()}
        for key, by_lang in spec.items():
            if key == "lang_names":
                if not isinstance(by_lang, dict) or not all(isinstance(v, dict) for v in by_lang.values()):
                    raise DataError(path, None, "lang_names", "expected {template_lang: {code: name}}")
                for lang, names in by_lang.items():
                    lang_names.setdefault(lang, {}).update({str(k): str(v) for k, v in names.items()})
                continue
            if key not in FIELDS:
                raise DataError(path, None, key, f"unknown recipe; templates exist for {sorted(FIELDS)}")
            if not isinstance(by_lang, dict):
                raise DataError(path, None, key, "expected a mapping of language -> list of templates")
            merged = dict(templates[key])
            for lang, items in by_lang.items():
                where = f"{key}.{lang}"
                if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
                    raise DataError(path, None, where, "expected a non-empty list of template strings")
                for i, t in enumerate(items):
                    try:
                        check_template(key, t)
                    except ValueError as e:
                        raise DataError(path, None, f"{where}[{i}]", str(e)) from None
                merged[lang] = tuple(items)
            templates[key] = merged
        return cls(templates, lang_names)

    def pick(self, recipe: str, lang: str, rng: random.Random) -> tuple[str, str]:
        """A random template for `recipe` worded in `lang` (English if there is none); returns it and its language."""
        by_lang = self.templates[recipe]
        lang = lang if lang in by_lang else "en" if "en" in by_lang else sorted(by_lang)[0]
        return rng.choice(by_lang[lang]), lang

    def lang_name(self, code: str, in_lang: str) -> str:
        """Name of language `code` as written in a template of language `in_lang` (the code if unknown)."""
        return self.lang_names.get(in_lang, {}).get(code, code)
