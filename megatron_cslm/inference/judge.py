"""A judge model's 1-5 score of a spoken-dialogue answer, from any OpenAI-compatible chat-completions endpoint.

Why: the paper scores answer content with GPT-4o and the LLaMA-Omni-style rubric (helpfulness, relevance,
fluency, suitability for speech interaction). The endpoint may be OpenAI or a local vLLM server; only the
standard library speaks HTTP here (urllib), so nothing beyond the chat-completions protocol is assumed.

Invariants:
- A judge failure never stops an evaluation: transient faults (HTTP 429/5xx, connection errors, timeouts) and
  replies without a score in 1..5 are retried with exponential backoff; when the retries are spent the item
  gets ``{"score": None, "error": "<why>"}``. Other HTTP 4xx (a bad key, an unknown model) are not retried.
- Only successful scores are cached, one JSONL line per (model, prompt), keyed by the SHA-256 of both, so a
  rerun sends no request for an item already scored. Lines are appended and flushed one by one; a torn last
  line (an interrupted run) is ignored when the cache is read.
- The API key is read from the environment variable the user names, never from a flag or a file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JUDGE_PROMPT = """You are grading a voice assistant. A user asked a question out loud and the assistant answered \
out loud; you see both as text. Rate the answer on a scale from 1 (worst) to 5 (best), considering together:
- helpfulness: does it actually help the user with what they asked?
- relevance: does it stay on the question instead of drifting elsewhere?
- fluency: is it natural, well-formed language?
- suitability for speech: is it concise and easy to follow by ear (no tables, code, long lists or markup)?

Question: {question}
Answer: {answer}

Reply with the score only, a single integer from 1 to 5."""

_SCORE = re.compile(r"(?<![\d.])([1-5])(?:\.0+)?(?!\.?\d)")
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def judge_prompt(question: str, answer: str) -> str:
    """The rubric prompt for one (question transcript, text answer) pair."""
    return JUDGE_PROMPT.format(question=question.strip(), answer=answer.strip())


def parse_score(reply: str) -> int | None:
    """The score in a judge's reply: the first standalone integer 1..5 (``4``, ``Score: 4``, ``4/5``), else None."""
    match = _SCORE.search(reply or "")
    return int(match.group(1)) if match else None


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(f"{model}\n{prompt}".encode("utf-8")).hexdigest()


class _Transient(Exception):
    """A fault worth retrying."""


@dataclass
class JudgeConfig:
    url: str  # base URL (``http://host:8000/v1``) or the full ``.../chat/completions`` URL
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    cache: str | os.PathLike | None = None
    retries: int = 3  # attempts after the first one
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k
    timeout_s: float = 60.0
    max_tokens: int = 16

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


class Judge:
    """Scores answers with `config.model` at `config.endpoint`; `score` never raises for endpoint faults."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.api_key = os.environ.get(config.api_key_env, "")
        self.cache_path = Path(config.cache) if config.cache else None
        self._cache: dict[str, dict] = {}
        self.requests = 0  # HTTP requests sent (retries included): what a cached rerun must keep at 0
        if self.cache_path and self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._cache[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line

    def score(self, question: str, answer: str) -> dict:
        """{"score": int | None, "error": str | None, "cached": bool} for one answer."""
        prompt = judge_prompt(question, answer)
        key = cache_key(self.config.model, prompt)
        if key in self._cache:
            return {"score": self._cache[key]["score"], "error": None, "cached": True}
        error = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self._ask(prompt)
            except _Transient as e:
                error = str(e)
                log.warning("judge: attempt %d/%d failed: %s", attempt + 1, self.config.retries + 1, error)
                continue
            except RuntimeError as e:  # not worth retrying (bad key, unknown model)
                return {"score": None, "error": str(e), "cached": False}
            score = parse_score(reply)
            if score is not None:
                self._remember(key, score, reply)
                return {"score": score, "error": None, "cached": False}
            error = f"no score 1-5 in the reply {reply[:80]!r}"
            log.warning("judge: attempt %d/%d: %s", attempt + 1, self.config.retries + 1, error)
        return {"score": None, "error": f"{error} (after {self.config.retries + 1} attempts)", "cached": False}

    def _ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.config.model, "temperature": 0.0, "max_tokens": self.config.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.config.endpoint, data=body, headers=headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            message = f"HTTP {e.code} from {self.config.endpoint}"
            if e.code in _RETRY_STATUS:
                raise _Transient(message) from None
            raise RuntimeError(f"{message}: {e.read()[:200].decode('utf-8', 'replace')}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise _Transient(f"{self.config.endpoint}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(payload)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient(f"not a chat-completions reply: {payload[:80]!r}") from None

    def _remember(self, key: str, score: int, reply: str) -> None:
        entry = {"key": key, "model": self.config.model, "score": score, "reply": reply}
        self._cache[key] = entry
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
