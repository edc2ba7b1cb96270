"""Embedded toy bilingual speech-text corpus. The speech is SYNTHETIC: unit sequences made up from spelling.

Why: the quickstart runs the whole pipeline (tokenize, pretrain, SFT, generate) on a laptop CPU in minutes
with nothing downloaded. Real speech units need real audio and a 300M-parameter speech tokenizer; a tiny
model also cannot learn real speech in minutes. So every grapheme (a letter, digit or CJK character) is
"pronounced" as a fixed short sequence of unit ids, and each speaker stretches those units by its own
speaking rate and pauses at punctuation for its own length. Speech and text are then truly aligned and a
tiny model can learn ASR, TTS and interleaving from it. Nothing here sounds like anything.

The sentences (``megatron_cslm/toy/parallel.txt``: 160 English/Chinese pairs, ``toy/qa.txt``: 40 question/
answer pairs in both languages) were written for this project. `make_toy_corpus` writes, under ``out_dir``:

``manifest.jsonl``: ASR/TTS manifest, one line per (sentence, language, speaker), the same fields as
    ``tools/tokenize_speech.py`` writes: ``{"id", "text", "lang", "speaker", "units": [int],
    "words": [{"word", "start", "end"}]}``. Word timestamps are unit indices, ``end`` exclusive; a word is a
    space-separated word, or one character for Chinese (`megatron_cslm.data.chunking.split_pieces`), its string
    without punctuation. The words tile the utterance: word i+1 starts where word i ends, the first starts
    at 0 and the last ends at ``len(units)`` (a pause, and the short silence between space-separated words,
    belongs to the word before it).
``reading.jsonl``: the same fields for ``reading`` read-speech utterances (`make_toy_corpus`; none by default):
    random word sequences over the corpus's lexicon (`random_sentences`), the toy's LibriSpeech, so a model
    can learn to read words in orders it never heard; none equals a held-out question.
``repeat_dialogue.jsonl``: ``reading_dialogues`` dialogues (none by default) in ``dialogue_sft.jsonl``'s format
    over the first read-speech utterances: a system turn asking to repeat (`REPEAT_INSTRUCTIONS`), the user's
    utterance, and the assistant saying the same words in its voice. SFT on spoken Q/A alone teaches the TQ
    step 32 questions per language, which a tiny model recalls instead of reading (held-out TQ CER 0.23-0.27
    after SFT against 0.02 before, measured); these keep the transcription step reading, as the paper's SFT set
    does with its thousands of questions.
``parallel.jsonl``: ``{"id", "en", "zh", "en_units", "zh_units"}``, each side spoken by one speaker.
``instruct.jsonl``: text instruction data in the CSLM authors' format ``{"id", "lang", "prompt", "response"}``.
``dialogue_sft.jsonl``: speech-aware spoken dialogue for SFT, one dialogue per line::

    {"id": str, "lang": "en" | "zh",
     "turns": [{"role": "user", "text": str, "units": [int], "speaker": str},
               {"role": "assistant", "text": str, "units": [int], "speaker": str,
                "words": [{"word": str, "start": int, "end": int}]},
               ...]}

    Turns alternate user/assistant and end with the assistant. ``text`` is the transcript of ``units``;
    assistant ``words`` are timestamps into that turn's ``units`` (as in the manifest), so the SFT layer can
    cut the answer into text/speech chunks at word boundaries. The assistant always speaks with the voice
    of speaker 0 (a spoken assistant has one voice); users are the other speakers. ``speaker`` is optional
    for readers.
``heldout.jsonl``: spoken questions never trained on, for the quickstart's check that the model learned
    (TQ error on unseen speech, answers matching the reference): ``{"id", "lang", "question", "answer",
    "units", "speaker"}``. Every `HELDOUT_EVERY`-th Q/A pair is held out of ``dialogue_sft.jsonl``, and no
    held-out question is spoken anywhere else in the corpus (``manifest.jsonl`` and ``parallel.jsonl`` hold
    only ``parallel.txt``); their *text* Q/A stays in ``instruct.jsonl``, so a right spoken answer shows text
    knowledge carried over to speech, as the paper's text-replay pretraining intends.
``info.json``: counts, the unit range used, the speakers' parameters, and ``"synthetic": true``.

Every record with units, and ``info.json``, carries ``"speech_tokenizer"``: the toy's own identity
(`toy_identity`: name ``toy-g2u``, a nominal 25 units/s, ``num_units`` codes, weights ``synthetic:seed=N``), so
the pipeline's joins check it like a real tokenizer's and refuse to mix toy units with S3 units.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_cslm.data.chunking import split_pieces
from megatron_cslm.fileio import atomic_open, write_json
from megatron_cslm.inference.metrics import normalize
from megatron_cslm.speech.identity import IDENTITY_KEY, SpeechTokenizerId

TOY_DIR = Path(__file__).parent
SILENCE_UNIT = 0
# Toy speech uses units [0, TOY_UNIT_RANGE) only, so a tiny model sees each unit often even with the real
# 4,096-unit vocabulary; unit 0 is silence.
TOY_UNIT_RANGE = 512
PAUSE_MARKS = frozenset(",.!?;:，。！？；：、")
_LATIN_WORD = re.compile(r"[A-Za-z']+")
ASSISTANT_SPEAKER = 0
TOY_TOKENIZER = "toy-g2u"  # grapheme -> unit map with per-speaker durations (ToySpeech)
TOY_UNITS_PER_SECOND = 25  # nominal: toy units have no audio; the paper's rate, so the README's sizes apply
REPEAT_INSTRUCTIONS = {"en": "Repeat what I say.", "zh": "重复我说的话。"}
HELDOUT_EVERY = 5  # Q/A pair i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1


def is_heldout(index: int) -> bool:
    """Whether Q/A pair `index` (in `qa_pairs()` order) is held out of SFT for evaluation."""
    return index % HELDOUT_EVERY == HELDOUT_EVERY - 1


def _read_tsv(name: str, fields: int) -> list[list[str]]:
    rows = []
    for lineno, line in enumerate((TOY_DIR / name).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        row = line.split("\t")
        if len(row) != fields or not all(x.strip() for x in row):
            raise ValueError(f"{TOY_DIR / name}:{lineno}: expected {fields} non-empty tab-separated fields")
        rows.append(row)
    return rows


def parallel_sentences() -> list[tuple[str, str]]:
    """The toy (English, Chinese) sentence pairs."""
    return [(en, zh) for en, zh in _read_tsv("parallel.txt", 2)]


def qa_pairs() -> list[dict[str, tuple[str, str]]]:
    """The toy question/answer pairs: ``{"en": (question, answer), "zh": (question, answer)}``."""
    return [{"en": (eq, ea), "zh": (zq, za)} for eq, ea, zq, za in _read_tsv("qa.txt", 4)]


def bare_word(piece: str) -> str:
    """A word piece without surrounding whitespace and punctuation, as forced aligners report words."""
    word = piece.strip()
    while word and unicodedata.category(word[0]).startswith("P"):
        word = word[1:]
    while word and unicodedata.category(word[-1]).startswith("P"):
        word = word[:-1]
    return word


@dataclass(frozen=True)
class Voice:
    """A toy speaker: `rate` is the mean number of repeats of each unit, `pause` the silence at punctuation."""

    name: str
    rate: float
    pause: int


class ToySpeech:
    """Deterministic synthetic "speech": grapheme -> fixed unit sequence, stretched per speaker.

    Args:
        num_units: size of the speech-unit vocabulary the units must fit (4,096 for CosyVoice S3).
        num_speakers: number of toy voices.
        seed: picks the voices and the per-utterance duration jitter; the grapheme -> unit map never changes.
        unit_range: units are drawn from [0, min(unit_range, num_units)).
    """

    def __init__(self, num_units: int = 4096, num_speakers: int = 4, seed: int = 0,
                 unit_range: int = TOY_UNIT_RANGE):
        self.unit_range = min(unit_range, num_units)
        if self.unit_range < 16:
            raise ValueError(f"toy speech needs at least 16 units, got num_units={num_units}, "
                             f"unit_range={unit_range}")
        if num_speakers < 1:
            raise ValueError(f"need at least one speaker, got {num_speakers}")
        self.num_units, self.seed = num_units, seed
        rng = random.Random(f"{seed}|voices")
        self.voices = [Voice(f"toy_spk{s}", round(rng.uniform(1.0, 2.2), 2), rng.randint(2, 4))
                       for s in range(num_speakers)]
        self._cache: dict[str, tuple[int, ...]] = {}

    def grapheme_units(self, char: str) -> tuple[int, ...]:
        """The fixed units of one character: 2 for a letter or digit, 3 for other scripts (a CJK syllable is
        longer), none for whitespace, punctuation and symbols (pauses are added by `speak`)."""
        char = char.lower()
        if char not in self._cache:
            if not char.isalnum():
                units: tuple[int, ...] = ()
            else:
                digest = hashlib.blake2b(char.encode("utf-8"), digest_size=16, person=b"cslm-toy").digest()
                n = 2 if char.isascii() else 3
                units = tuple(1 + int.from_bytes(digest[2 * i:2 * i + 2], "big") % (self.unit_range - 1)
                              for i in range(n))
            self._cache[char] = units
        return self._cache[char]

    def speak(self, text: str, speaker: int, key: str) -> tuple[list[int], list[dict]]:
        """Units of `text` said by `speaker`, and word timestamps that tile them.

        `key` (e.g. the utterance id) seeds the duration jitter, so the same sentence said twice differs.
        """
        voice = self.voices[speaker]
        rng = random.Random(f"{self.seed}|{speaker}|{key}")
        units: list[int] = []
        words: list[dict] = []
        for piece in split_pieces(text):
            if units and piece[:1].isspace():  # a short silence between words, the word before's
                units += [SILENCE_UNIT] * max(1, round(rng.gauss(voice.rate, 0.5)))
                if words:
                    words[-1]["end"] = len(units)
            start = len(units)
            for char in piece:
                if char in PAUSE_MARKS:
                    units += [SILENCE_UNIT] * voice.pause
                for u in self.grapheme_units(char):
                    units += [u] * max(1, round(rng.gauss(voice.rate, 0.5)))
            if bare_word(piece) and any(c.isalnum() for c in piece):
                words.append({"word": bare_word(piece), "start": start if words else 0, "end": len(units)})
            elif words:  # an unspoken piece (a lone dash, a trailing space): its pause joins the word before
                words[-1]["end"] = len(units)
        if not words:
            raise ValueError(f"nothing to say in {text!r}: no letters, digits or characters")
        return units, words


def random_sentences(texts: list[str], count: int, seed: int, avoid: frozenset[str] = frozenset()
                     ) -> list[tuple[str, str]]:
    """`count` (lang, sentence) pairs, English and Chinese in turn: 3-8 random words of the English in `texts`
    (the first capitalised, a full stop) or 4-10 random CJK characters of it (a Chinese full stop). Sentences
    whose normalised text is in `avoid` (`normalize`) are drawn again."""
    words = sorted({w for t in texts for w in _LATIN_WORD.findall(t)})
    chars = sorted({c for t in texts for c in t if c.isalnum() and not c.isascii()})
    if not words or not chars:
        raise ValueError("random_sentences needs English words and CJK characters in its texts")
    rng, out = random.Random(f"{seed}|reading"), []
    while len(out) < count:
        if len(out) % 2 == 0:
            picked = [rng.choice(words) for _ in range(rng.randint(3, 8))]
            lang, sentence = "en", " ".join(picked)[:1].upper() + " ".join(picked)[1:] + "."
        else:
            lang, sentence = "zh", "".join(rng.choice(chars) for _ in range(rng.randint(4, 10))) + "。"
        if normalize(sentence) not in avoid:
            out.append((lang, sentence))
    return out


def _jsonl(path: Path, records: list[dict]) -> int:
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)


def toy_identity(num_units: int = 4096, seed: int = 0) -> SpeechTokenizerId:
    """The toy corpus's speech tokenizer identity (see the module docstring)."""
    return SpeechTokenizerId(TOY_TOKENIZER, TOY_UNITS_PER_SECOND, num_units, f"synthetic:seed={int(seed)}")


def make_toy_corpus(out_dir: str | Path, num_units: int = 4096, seed: int = 0, speakers: int = 4,
                    reading: int = 0, reading_dialogues: int = 0) -> dict:
    """Write the toy corpus (see module docstring) into `out_dir`, with `reading` read-speech utterances and
    `reading_dialogues` (at most `reading`) repeat dialogues over them; returns the info written to info.json."""
    if not 0 <= reading_dialogues <= reading:
        raise ValueError(f"reading_dialogues must be in [0, reading={reading}], got {reading_dialogues}")
    out_dir = Path(out_dir)
    tts = ToySpeech(num_units=num_units, num_speakers=speakers, seed=seed)
    pairs = parallel_sentences()
    qa = qa_pairs()

    manifest = []
    for i, (en, zh) in enumerate(pairs):
        for lang, text in (("en", en), ("zh", zh)):
            for s, voice in enumerate(tts.voices):
                uid = f"toy-{lang}-{i:03d}-{voice.name}"
                units, words = tts.speak(text, s, uid)
                manifest.append({"id": uid, "text": text, "lang": lang, "speaker": voice.name,
                                 "units": units, "words": words})

    parallel = []
    for i, (en, zh) in enumerate(pairs):
        rng = random.Random(f"{seed}|parallel|{i}")
        pid = f"toy-par-{i:03d}"
        rec = {"id": pid, "en": en, "zh": zh}
        for lang, text in (("en", en), ("zh", zh)):
            rec[f"{lang}_units"] = tts.speak(text, rng.randrange(speakers), f"{pid}-{lang}")[0]
        parallel.append(rec)

    instruct = [{"id": f"toy-ins-{lang}-{i:03d}", "lang": lang, "prompt": q[lang][0], "response": q[lang][1]}
                for lang in ("en", "zh") for i, q in enumerate(qa)]

    dialogues, heldout = [], []
    trained = [i for i in range(len(qa)) if not is_heldout(i)]
    for lang in ("en", "zh"):
        rng = random.Random(f"{seed}|dialogue|{lang}")
        order = list(trained)
        rng.shuffle(order)
        # Every trained pair once as a single-turn dialogue, then pairs of them as two-turn dialogues.
        convs = [[i] for i in trained] + [order[k:k + 2] for k in range(0, len(order) - 1, 2)]
        for n, conv in enumerate(convs):
            did = f"toy-dlg-{lang}-{n:03d}"
            user = rng.randrange(1, speakers) if speakers > 1 else ASSISTANT_SPEAKER
            turns = []
            for t, i in enumerate(conv):
                question, answer = qa[i][lang]
                q_units, _ = tts.speak(question, user, f"{did}-{t}-user")
                a_units, a_words = tts.speak(answer, ASSISTANT_SPEAKER, f"{did}-{t}-assistant")
                turns.append({"role": "user", "text": question, "units": q_units,
                              "speaker": tts.voices[user].name})
                turns.append({"role": "assistant", "text": answer, "units": a_units,
                              "speaker": tts.voices[ASSISTANT_SPEAKER].name, "words": a_words})
            dialogues.append({"id": did, "lang": lang, "turns": turns})
        for i in (i for i in range(len(qa)) if is_heldout(i)):
            hid = f"toy-heldout-{lang}-{i:03d}"
            user = 1 + i % (speakers - 1) if speakers > 1 else ASSISTANT_SPEAKER
            question, answer = qa[i][lang]
            heldout.append({"id": hid, "lang": lang, "question": question, "answer": answer,
                            "units": tts.speak(question, user, hid)[0], "speaker": tts.voices[user].name})

    lexicon = [t for en, zh in pairs for t in (en, zh)] + [t for q in qa for side in q.values() for t in side]
    avoid = frozenset(normalize(r["question"]) for r in heldout)
    read = []
    for k, (lang, text) in enumerate(random_sentences(lexicon, reading, seed, avoid)):
        uid, speaker = f"toy-read-{lang}-{k:05d}", k % speakers
        units, words = tts.speak(text, speaker, uid)
        read.append({"id": uid, "text": text, "lang": lang, "speaker": tts.voices[speaker].name, "units": units,
                     "words": words})
    repeats = []
    for rec in read[:reading_dialogues]:
        did = rec["id"].replace("toy-read-", "toy-repeat-")
        a_units, a_words = tts.speak(rec["text"], ASSISTANT_SPEAKER, f"{did}-assistant")
        repeats.append({"id": did, "lang": rec["lang"], "turns": [
            {"role": "system", "text": REPEAT_INSTRUCTIONS[rec["lang"]]},
            {"role": "user", "text": rec["text"], "units": rec["units"], "speaker": rec["speaker"]},
            {"role": "assistant", "text": rec["text"], "units": a_units,
             "speaker": tts.voices[ASSISTANT_SPEAKER].name, "words": a_words}]})

    identity = toy_identity(num_units, seed).to_dict()
    spoken_pairs = [p for p in parallel if "en_units" in p or "zh_units" in p]
    for rec in manifest + read + heldout + dialogues + repeats + spoken_pairs:
        rec[IDENTITY_KEY] = identity
    info = {
        "synthetic": True, IDENTITY_KEY: identity,
        "description": "megatron_cslm toy corpus: project-written sentences with SYNTHETIC speech units "
                       "(fixed grapheme -> unit map, per-speaker durations); not real speech.",
        "num_units": num_units, "unit_range": tts.unit_range, "silence_unit": SILENCE_UNIT, "seed": seed,
        "speakers": [asdict(v) for v in tts.voices],
        "files": {
            "manifest.jsonl": _jsonl(out_dir / "manifest.jsonl", manifest),
            "parallel.jsonl": _jsonl(out_dir / "parallel.jsonl", parallel),
            "instruct.jsonl": _jsonl(out_dir / "instruct.jsonl", instruct),
            "dialogue_sft.jsonl": _jsonl(out_dir / "dialogue_sft.jsonl", dialogues),
            "heldout.jsonl": _jsonl(out_dir / "heldout.jsonl", heldout),
            "reading.jsonl": _jsonl(out_dir / "reading.jsonl", read),
            "repeat_dialogue.jsonl": _jsonl(out_dir / "repeat_dialogue.jsonl", repeats),
        },
    }
    write_json(out_dir / "info.json", info)
    return info
