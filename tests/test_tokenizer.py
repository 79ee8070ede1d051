"""Tests for trainer.tokenizer: training, round trips, special tokens, bits-per-byte support, files, chat."""

import json
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from trainer.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    ensure_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

VOCAB = 512
SAMPLES = [
    "Hello world! The quick brown fox, 12345 times.",
    "  leading spaces, trailing tabs\t\t\nand\n\n\nblank lines   \r\n",
    "unicode: café naïve Zürich — 日本語のテキスト 🎉🚀 مرحبا",
    "code:\n    def f(x):\n        return x ** 2  # square\n",
    "",
    "<|bos|> is plain text inside a document",
]


def corpus() -> list[str]:
    """A few hundred English-ish sentences from made-up words: enough repetition for 247 merges."""
    rng = random.Random(0)
    syllables = ["ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "qui", "ro"]
    syllables += ["sa", "te", "vi", "wo", "th", "st", "ing", "er", "an", "ed"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    return [
        " ".join(rng.choices(words, k=12)).capitalize() + rng.choice(".!?") + f" {rng.randint(0, 999)}"
        for _ in range(400)
    ]


def no_texts() -> Iterable[str]:
    raise AssertionError("texts_factory called although a tokenizer exists")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path]:
    out_dir = tmp_path_factory.mktemp("tok")
    return train_tokenizer(corpus(), VOCAB, out_dir), out_dir


def test_training_is_fast_and_writes_one_json_file(tmp_path: Path):
    start = time.perf_counter()
    tok = train_tokenizer(corpus(), VOCAB, tmp_path / "new")
    assert time.perf_counter() - start < 5.0
    assert tok.vocab_size == VOCAB
    assert os.listdir(tmp_path / "new") == ["tokenizer.json"]  # no temp file left behind
    data = json.loads((tmp_path / "new" / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    assert [t["content"] for t in data["added_tokens"]] == SPECIAL_TOKENS


def test_too_little_text_for_the_vocab_is_an_error(tmp_path: Path):
    with pytest.raises(ValueError, match="smaller vocab_size"):
        train_tokenizer(["tiny corpus"], VOCAB, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(trained: tuple[Tokenizer, Path], text: str):
    tok, _ = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_merges_compress_training_like_text(trained: tuple[Tokenizer, Path]):
    tok, _ = trained
    text = corpus()[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_encode_batch_prepends_bos(trained: tuple[Tokenizer, Path]):
    tok, _ = trained
    batch = tok.encode_batch(SAMPLES)
    assert batch == [[tok.bos_id, *tok.encode(t)] for t in SAMPLES]
    assert tok.encode_batch(SAMPLES, prepend_bos=False) == [tok.encode(t) for t in SAMPLES]


def test_special_tokens_are_single_ids_and_not_forgeable(trained: tuple[Tokenizer, Path]):
    tok, _ = trained
    ids = [tok.special_id(name) for name in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.bos_id == tok.special_id("<|bos|>")
    assert tok.decode(ids) == "".join(SPECIAL_TOKENS)
    # The same characters inside a document are plain text, never the special ids.
    assert not set(tok.encode("".join(SPECIAL_TOKENS))) & set(ids)
    with pytest.raises(KeyError):
        tok.special_id("<|nope|>")


def test_token_bytes_sum_to_utf8_length(trained: tuple[Tokenizer, Path]):
    tok, _ = trained
    token_bytes = tok.token_bytes()
    assert len(token_bytes) == tok.vocab_size
    assert all(token_bytes[tok.special_id(name)] == 0 for name in SPECIAL_TOKENS)
    for text in SAMPLES:  # includes multi-byte characters split across byte tokens
        ids = tok.encode_batch([text])[0]  # with bos, which counts 0 bytes
        assert sum(token_bytes[i] for i in ids) == len(tok.decode(ids[1:]).encode("utf-8"))


def test_ensure_loads_existing_without_training(trained: tuple[Tokenizer, Path]):
    tok, out_dir = trained
    path = out_dir / "tokenizer.json"
    mtime = path.stat().st_mtime_ns
    loaded = ensure_tokenizer(out_dir, no_texts, VOCAB)
    assert path.stat().st_mtime_ns == mtime
    assert loaded.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])
    assert load_tokenizer(out_dir).token_bytes() == tok.token_bytes()


def test_ensure_trains_when_missing(tmp_path: Path):
    tok = ensure_tokenizer(tmp_path / "fresh", corpus, VOCAB)
    assert tok.vocab_size == VOCAB and (tmp_path / "fresh" / "tokenizer.json").is_file()


def test_ensure_rejects_vocab_mismatch(trained: tuple[Tokenizer, Path]):
    _, out_dir = trained
    with pytest.raises(ValueError, match="vocab_size 512, not the requested 1024") as info:
        ensure_tokenizer(out_dir, no_texts, 1024)
    assert "\n" not in str(info.value)


def test_load_missing_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_render_conversation_masks_assistant_only(trained: tuple[Tokenizer, Path]):
    tok, _ = trained
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, I think."},
    ]
    ids, mask = tok.render_conversation(messages)
    sid = tok.special_id
    expected = [tok.bos_id]
    expected += [sid("<|user_start|>"), *tok.encode("Be brief.\n\nWhat is 2+2?"), sid("<|user_end|>")]
    expected += [sid("<|assistant_start|>"), *tok.encode("4."), sid("<|assistant_end|>")]
    expected += [sid("<|user_start|>"), *tok.encode("And 3+3?"), sid("<|user_end|>")]
    expected += [sid("<|assistant_start|>"), *tok.encode("6, I think."), sid("<|assistant_end|>")]
    assert ids == expected
    supervised = [i for i, m in zip(ids, mask, strict=True) if m == 1]
    assert supervised == [
        *tok.encode("4."),
        sid("<|assistant_end|>"),
        *tok.encode("6, I think."),
        sid("<|assistant_end|>"),
    ]
    assert set(mask) == {0, 1}


def test_render_conversation_rejects_bad_role_order(trained: tuple[Tokenizer, Path]):
    tok, _ = trained
    with pytest.raises(ValueError, match="expected 'user'"):
        tok.render_conversation([{"role": "assistant", "content": "hi"}])
