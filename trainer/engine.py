"""Text generation from a trained model: KV cache, batched prefill and decode, temperature, top-k, stops.

The interface other code relies on (chat, export, evals, samples during training):

    engine = Engine.from_checkpoint(layout.latest(stage_dir), device)   # or Engine(model, tokenizer)
    ids = engine.chat_prompt([{"role": "user", "content": "Hi"}])     # rendered exactly as SFT trained
    [completion] = engine.generate([ids], max_tokens=64)               # greedy: temperature 0
    for tokens in engine.stream([ids], max_tokens=64, temperature=0.8, top_k=50, seed=1): ...
    engine.decode(completion)

Prompts of different lengths share one batch: they are right-padded, prefilled in one forward pass, and
each row then decodes at its own position (see `KVCache`). A row stops at `<|assistant_end|>` or
`<|bos|>` (a base model ending its document); stop tokens are not part of the returned completion.
Sampling draws from its own generator, never torch's global RNG, so generating in the middle of training
leaves the training trajectory untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint_layout as layout
from trainer.checkpoint import load_tensors
from trainer.model import GPT, GPTConfig, KVCache, model_from_weights
from trainer.tokenizer import Tokenizer, load_tokenizer

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast where training used it (CUDA, compute capability >= 8), else plain float32."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, autocast: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.lm_head.weight.device
        self.autocast = autocast_for(self.device) if autocast is None else autocast
        self.stop_ids = [tokenizer.special_id(name) for name in STOP_TOKENS]
        self.max_len = model.rotary_seq_len  # the longest prompt + completion a row can hold

    @classmethod
    def from_checkpoint(cls, ckpt: layout.Checkpoint, device: torch.device | str = "cpu",
                        tokenizer: Tokenizer | None = None) -> Engine:
        """A complete checkpoint's weights (never its optimizer) and the volume's tokenizer next to it.

        ckpt.path is <base_dir>/<stage>_checkpoints/<tag>/step_N, so the tokenizer is <base_dir>/tokenizer.
        """
        config = GPTConfig(**ckpt.meta()["model_config"])
        tokenizer = tokenizer or load_tokenizer(ckpt.path.parents[2] / "tokenizer")
        return cls(model_from_weights(config, load_tensors(ckpt, "model.safetensors"), device), tokenizer)

    @classmethod
    def from_files(cls, weights: Path, config: dict[str, Any], tokenizer_dir: Path,
                   device: torch.device | str = "cpu") -> Engine:
        """Weights from a safetensors file (any float dtype) with the model config given as a dict."""
        from safetensors.torch import load_file

        names = {field.name for field in fields(GPTConfig)}  # config.json carries other keys too
        model_config = GPTConfig(**{k: v for k, v in config.items() if k in names})
        return cls(model_from_weights(model_config, load_file(str(weights), device="cpu"), device),
                   load_tokenizer(tokenizer_dir))

    # --- prompts ---------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation ending with a user message, rendered as SFT renders it, + `<|assistant_start|>`."""
        ids, _ = self.tokenizer.render_conversation(messages)
        return [*ids, self.tokenizer.special_id("<|assistant_start|>")]

    def text_prompt(self, text: str) -> list[int]:
        """Plain completion (a base model): a document that starts with `text`."""
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # --- generation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0) -> Iterator[list[int | None]]:
        """Yield one token per row per decoding step (None for a row that has stopped) until every row
        has stopped or produced max_tokens. temperature 0 is greedy (argmax, no randomness)."""
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token (start it with <|bos|>)")
        lengths = [len(p) for p in prompts]
        total = max(lengths) + max_tokens
        if total > self.max_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens + {max_tokens} new ones exceeds the model's "
                             f"{self.max_len}-token context: shorten the prompt or ask for fewer tokens")
        generator = torch.Generator(device=self.device).manual_seed(seed) if temperature > 0 else None
        cache_dtype = torch.bfloat16 if isinstance(self.autocast, torch.autocast) else torch.float32
        cache = KVCache(self.model.config, len(prompts), total, self.device, cache_dtype)
        batch = torch.full((len(prompts), max(lengths)), self.tokenizer.bos_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            batch[row, :len(prompt)] = torch.tensor(prompt)
        last = torch.tensor(lengths, device=self.device) - 1
        stop_ids = torch.tensor(self.stop_ids, device=self.device)
        active = torch.ones(len(prompts), dtype=torch.bool, device=self.device)
        with self.autocast:
            logits = self.model(batch.to(self.device), cache=cache)  # prefill, every row at once
        logits = logits[torch.arange(len(prompts), device=self.device), last]  # each row's last real token
        cache.lengths.copy_(last + 1)  # padding past a prompt's end is masked, then overwritten
        for _ in range(max_tokens):
            token = self._pick(logits, temperature, top_k, generator)
            active &= ~torch.isin(token, stop_ids)
            yield [t if a else None for t, a in zip(token.tolist(), active.tolist(), strict=True)]
            if not active.any():
                return
            with self.autocast:
                logits = self.model(token[:, None], cache=cache)[:, -1]

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0) -> list[list[int]]:
        """Each prompt's completion (token ids, stop token excluded)."""
        completions: list[list[int]] = [[] for _ in prompts]
        for tokens in self.stream(prompts, max_tokens, temperature, top_k, seed):
            for row, token in enumerate(tokens):
                if token is not None:  # once a row has stopped, it yields None to the end
                    completions[row].append(token)
        return completions

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        logits = logits.float()
        if temperature <= 0:
            return logits.argmax(dim=-1)
        if top_k is not None and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

