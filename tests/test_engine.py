"""Tests for trainer.engine and the model's KV cache: the cache changes nothing but the cost.

In-process, on small random models (weights drawn wide so that greedy decoding wanders instead of
repeating one token); the same check on a really trained model is in tests/test_chat.py.
"""

from __future__ import annotations

import pytest
import torch

from trainer.engine import Engine
from trainer.model import GPT, GPTConfig, KVCache, build_model

# Grouped-query attention (4 query heads over 2 key/value heads) so the cache path covers enable_gqa.
CONFIG = GPTConfig(sequence_len=16, vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
BOS, END = 0, 1


class StubTokenizer:
    """The two ids the engine asks a tokenizer for; these tests feed token ids directly."""

    bos_id = BOS

    def special_id(self, name: str) -> int:
        return {"<|bos|>": BOS, "<|assistant_end|>": END}[name]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small gain nothing from threads, and on a busy machine their spin-waits cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = build_model(CONFIG, "cpu")
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return model


@torch.no_grad()
def greedy_without_cache(model: GPT, prompt: list[int], max_tokens: int, stop_ids: list[int]) -> list[int]:
    """The reference: the whole sequence recomputed for every new token, one prompt at a time."""
    ids = list(prompt)
    for _ in range(max_tokens):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token in stop_ids:
            break
        ids.append(token)
    return ids[len(prompt):]


PROMPTS = [[BOS, 5, 6, 7], [BOS, 9], [BOS, *range(20, 33)], [BOS, 40, 41, 42, 43, 44, 45]]


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_greedy_with_cache_equals_full_recompute_per_prompt(seed):
    model = random_model(seed)
    engine = Engine(model, StubTokenizer())
    batched = engine.generate(PROMPTS, max_tokens=32)
    reference = [greedy_without_cache(model, p, 32, [BOS, END]) for p in PROMPTS]
    assert batched == reference
    assert sum(len(c) for c in batched) > 32  # long decodes, not rows that stopped at once
    # A row's result does not depend on what shares its batch.
    assert engine.generate(PROMPTS[1:2], max_tokens=32) == reference[1:2]


def test_cached_logits_match_the_full_forward_at_every_position():
    model = random_model()
    ids = torch.tensor([[BOS, *range(10, 30)]])
    full = model(ids)
    cache = KVCache(CONFIG, 1, ids.size(1), "cpu")
    chunks = [model(ids[:, :7], cache=cache), *(model(ids[:, t:t + 1], cache=cache) for t in range(7, 21))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [21]


def test_stops_at_assistant_end_and_excludes_it():
    model = random_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[END] = 1.0  # END is the top logit everywhere
    assert Engine(model, StubTokenizer()).generate(PROMPTS, max_tokens=5) == [[], [], [], []]


def test_sampling_is_seeded_top_k_bounded_and_leaves_the_global_rng_alone():
    model = random_model()
    engine = Engine(model, StubTokenizer())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = engine.generate(PROMPTS, max_tokens=12, temperature=1.5, top_k=3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert engine.generate(PROMPTS, max_tokens=12, temperature=1.5, top_k=3, seed=7) == first
    assert engine.generate(PROMPTS, max_tokens=12, temperature=1.5, top_k=3, seed=8) != first
    # top_k=1 is greedy whatever the temperature.
    assert engine.generate(PROMPTS, max_tokens=12, temperature=2.0, top_k=1) == engine.generate(PROMPTS, 12)


def test_a_prompt_past_the_context_is_refused():
    engine = Engine(random_model(), StubTokenizer())
    with pytest.raises(ValueError, match="context"):
        engine.generate([[BOS] * (engine.max_len - 3)], max_tokens=10)
