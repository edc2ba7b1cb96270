"""Generated ids -> chain-of-modality chunks: TQ, then TA and SA chunks, with malformed output tolerated.

The trained layout is `[question] TQ [answer] TA1 <sosp> SA1 <eosp> TA2 <sosp> SA2 <eosp> ... <stop>`.
Sampled output does not always follow it, and one bad item must not end a benchmark run, so every
deviation is repaired in the most useful direction and counted under a warning name:

  missing_question    text before any [question] (taken as TQ)
  repeated_question   a second [question] (ignored)
  missing_answer      <sosp> or the end reached while still in TQ (TQ closed there)
  repeated_answer     a second [answer] (ends the current text chunk, otherwise ignored)
  nested_sosp         <sosp> inside speech (ignored)
  unclosed_sosp       speech ended by a marker, a stop or the end instead of <eosp> (chunk kept)
  stray_eosp          <eosp> outside speech (ignored)
  empty_speech        <sosp><eosp> (no chunk)
  unit_outside_speech a unit id in text (dropped: it has no text form)
  text_inside_speech  a text id between <sosp> and <eosp> (dropped)
  stray_special       a control token such as <|start_header_id|> or a padding id (dropped)
  tokens_after_stop   ids after the stop token, e.g. in a decoded file (ignored)
  no_stop             generation hit the length limit (the answer may be cut)
  no_speech           the answer has no speech chunk at all

`ResponseParser` is incremental so the streaming generator and the offline parser are the same code.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

from megatron_cslm.inference.vocab import Vocab
from megatron_cslm.text.tokenizer import SpeechTextTokenizer

ChunkKind = Literal["tq", "ta", "sa"]


@dataclass
class ResponseChunk:
    """One complete piece of the answer.

    `end_token` is how many generated tokens had been consumed when the chunk completed (the token-count
    latency); `time_s` the wall time since the request started, when generation timed it.
    """

    kind: ChunkKind
    index: int  # position among chunks of the same kind
    text: str = ""  # tq/ta: decoded text, whitespace kept so TA chunks concatenate to the answer
    units: list[int] = field(default_factory=list)  # sa: unit indices (0..num_units-1)
    num_tokens: int = 0  # content tokens (text tokens or units), markers excluded
    end_token: int = 0
    time_s: float | None = None

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "index": self.index, "num_tokens": self.num_tokens, "end_token": self.end_token,
             "time_s": self.time_s}
        d.update({"units": self.units} if self.kind == "sa" else {"text": self.text})
        return d


@dataclass
class ParsedResponse:
    """All chunks of one response plus the warnings raised while parsing it."""

    chunks: list[ResponseChunk]
    warnings: Counter
    num_tokens: int  # generated tokens consumed, stop token included
    stopped: bool

    def of_kind(self, kind: ChunkKind) -> list[ResponseChunk]:
        return [c for c in self.chunks if c.kind == kind]

    @property
    def question_text(self) -> str:
        return "".join(c.text for c in self.of_kind("tq")).strip()

    @property
    def answer_text(self) -> str:
        return "".join(c.text for c in self.of_kind("ta")).strip()

    @property
    def speech_units(self) -> list[int]:
        return [u for c in self.of_kind("sa") for u in c.units]


class ResponseParser:
    """Feed generated ids one at a time; each call returns the chunks that the id completed."""

    def __init__(self, tok: SpeechTextTokenizer, vocab: Vocab | None = None):
        self.tok = tok
        self.vocab = vocab or Vocab.of(tok)
        self.chunks: list[ResponseChunk] = []
        self.warnings: Counter = Counter()
        self._section: Literal["start", "question", "answer"] = "start"
        self._in_speech = False
        self._text: list[int] = []
        self._units: list[int] = []
        self._consumed = 0
        self._stopped = False
        self._finished = False

    def feed(self, token_id: int, time_s: float | None = None) -> list[ResponseChunk]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        v, t = self.vocab, int(token_id)
        if self._stopped:
            if not self.warnings["tokens_after_stop"]:
                self.warnings["tokens_after_stop"] += 1
            return []
        self._consumed += 1
        out: list[ResponseChunk] = []
        if t in v.stops:
            self._close_speech(out, time_s, cleanly=False)
            self._close_text(out, time_s)
            self._stopped = True
        elif t == v.question:
            self._close_speech(out, time_s, cleanly=False)
            if self._section == "start":
                self._section = "question"
            else:
                self.warnings["repeated_question"] += 1
        elif t == v.answer:
            self._close_speech(out, time_s, cleanly=False)
            if self._section == "answer":
                self.warnings["repeated_answer"] += 1
            elif self._section == "start":
                self.warnings["missing_question"] += 1
            self._close_text(out, time_s)
            self._section = "answer"
        elif t == v.sosp:
            if self._in_speech:
                self.warnings["nested_sosp"] += 1
            else:
                if self._section != "answer":
                    self.warnings["missing_answer"] += 1
                self._close_text(out, time_s)
                self._section = "answer"
                self._in_speech = True
        elif t == v.eosp:
            if self._in_speech:
                self._close_speech(out, time_s, cleanly=True)
            else:
                self.warnings["stray_eosp"] += 1
        elif (unit := v.unit_of(t)) >= 0:
            if self._in_speech:
                self._units.append(unit)
            else:
                self.warnings["unit_outside_speech"] += 1
        elif t in v.control or not 0 <= t < v.size:
            self.warnings["stray_special"] += 1
        elif self._in_speech:
            self.warnings["text_inside_speech"] += 1
        else:
            if self._section == "start":
                self.warnings["missing_question"] += 1
                self._section = "question"
            self._text.append(t)
        return out

    def finish(self, time_s: float | None = None) -> list[ResponseChunk]:
        """Close whatever is open at the end of the ids; returns the chunks that completes."""
        out: list[ResponseChunk] = []
        if not self._finished:
            self._close_speech(out, time_s, cleanly=False)
            if self._section != "answer":
                self.warnings["missing_answer"] += 1
            self._close_text(out, time_s)
            if not self._stopped:
                self.warnings["no_stop"] += 1
            if not any(c.kind == "sa" for c in self.chunks):
                self.warnings["no_speech"] += 1
            self._finished = True
        return out

    def result(self) -> ParsedResponse:
        if not self._finished:
            raise RuntimeError("result() before finish()")
        return ParsedResponse(self.chunks, self.warnings, self._consumed, self._stopped)

    def _emit(self, out: list[ResponseChunk], chunk: ResponseChunk) -> None:
        self.chunks.append(chunk)
        out.append(chunk)

    def _close_text(self, out: list[ResponseChunk], time_s: float | None) -> None:
        ids, self._text = self._text, []
        text = self.tok.decode(ids)
        if not text.strip():
            return
        kind: ChunkKind = "ta" if self._section == "answer" else "tq"
        index = sum(c.kind == kind for c in self.chunks)
        self._emit(out, ResponseChunk(kind, index, text=text, num_tokens=len(ids), end_token=self._consumed,
                              time_s=time_s))

    def _close_speech(self, out: list[ResponseChunk], time_s: float | None, cleanly: bool) -> None:
        if not self._in_speech:
            return
        self._in_speech = False
        units, self._units = self._units, []
        if not cleanly:
            self.warnings["unclosed_sosp"] += 1
        if not units:
            self.warnings["empty_speech"] += 1
            return
        index = sum(c.kind == "sa" for c in self.chunks)
        self._emit(out, ResponseChunk("sa", index, units=units, num_tokens=len(units), end_token=self._consumed,
                              time_s=time_s))


def parse_response(tok: SpeechTextTokenizer, ids: Sequence[int], vocab: Vocab | None = None) -> ParsedResponse:
    """Parse a complete generated id sequence (the prompt excluded)."""
    parser = ResponseParser(tok, vocab)
    for t in ids:
        parser.feed(t)
    parser.finish()
    return parser.result()
