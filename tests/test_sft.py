"""The SFT stage as users run it: real processes on CPU, after a real (tiny) base stage, killed and resumed.

A module-scoped setup publishes the base corpus and a small synthetic chat dataset on a local Hub, trains
a finished tiny base stage once, and runs an uninterrupted SFT whose per-step losses and final weights
every interrupted scenario must match.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from entrypoint.demo.localhub import LocalHub
from tests.helpers import (
    MODEL_TAG,
    chat_conversations,
    publish_chat_dataset,
    publish_corpus,
    run_sft,
    run_trainer,
    step_losses,
    weights_sha256,
)
from trainer import checkpoint_layout as layout
from trainer.chat_data import ChatLoader, collate, epoch_order, render
from trainer.tokenizer import train_tokenizer

CONVERSATIONS = 200  # 32 held out (tiny preset), 168 to train on: 21 steps of 8 per epoch
STEPS = 42
# The tiny base model has seen 10 steps; these scenarios keep the lr fraction they were written with (0.2;
# nanochat's default, which SFT now uses, is 0.8).
ARGS = ("--num-epochs", "2", "--save-every", "5", "--init-lr-frac", "0.2")
NO_BASE = "error: base stage not finished: run base training first"


@dataclass
class Chat:
    env: dict[str, str]
    base: Path  # volume with a finished base stage, no SFT yet
    reference: Path  # the same after an uninterrupted SFT

    def volume(self, path: Path) -> Path:
        shutil.copytree(self.base, path)
        return path


def sft_dir(base: Path) -> Path:
    return layout.stage_dir(base, "sft", MODEL_TAG)


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Chat:
    root = tmp_path_factory.mktemp("sft")
    with LocalHub(root / "hub") as server:
        publish_corpus(server, root / "shards")
        publish_chat_dataset(server, CONVERSATIONS)
        env = {**os.environ, "HF_ENDPOINT": server.url,
               "HF_HOME": str(root / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "offline"}
        base = root / "base"
        code, out = run_trainer(base, env, "--num-iterations", "10", "--eval-every", "0")
        assert code == 0, out
        reference = root / "reference"
        shutil.copytree(base, reference)
        code, out = run_sft(reference, env, *ARGS)
        assert code == 0, out
        yield Chat(env, base, reference)


def test_sft_starts_from_the_finished_base_and_its_loss_falls(chat):
    losses = step_losses(chat.reference, "sft")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(list(losses.values())[-5:]) / 5 < 0.6 * sum(list(losses.values())[:5]) / 5
    records = (chat.reference / "logs" / f"train_sft_{MODEL_TAG}.jsonl").read_text().splitlines()
    val = [r["val_loss"] for r in map(json.loads, records) if "val_loss" in r]
    assert len(val) == 4 and val[-1] < 0.6 * val[0]  # steps 0, 20, 40 and the last
    final = layout.latest(sft_dir(chat.reference), full_hash=True)
    assert final.step == STEPS and final.done
    meta = final.meta()
    assert meta["stage"] == "sft" and meta["base"]["step"] == 10
    assert meta["loader"] == {"epoch": 2, "index": 0}  # exactly two passes over the 168 training rows


def test_kill9_mid_run_then_resume_is_bitwise_exact(chat, tmp_path):
    base = chat.volume(tmp_path / "volume")
    # Right after a save starts: the background writer may be mid-write when the process dies.
    code, out = run_sft(base, chat.env, *ARGS, kill_when=lambda line: "checkpoint step=" in line)
    assert code is None, out
    code, out = run_sft(base, chat.env, *ARGS, kill_when=lambda line: "step 00023/" in line)
    assert code is None, out
    latest = layout.latest(sft_dir(base))
    assert latest.step in (15, 20)  # the save of 20 waited for 15; 20 itself may still have been in flight
    code, out = run_sft(base, chat.env, *ARGS)
    assert code == 0, out
    assert f"resuming from step={latest.step} " in out
    assert f"gc_frozen step={latest.step + 1} " in out  # after the resumed process's first step
    assert not [p for p in sft_dir(base).iterdir() if p.name.startswith(layout.TMP_PREFIX)]
    assert weights_sha256(base, STEPS, stage="sft") == weights_sha256(chat.reference, STEPS, stage="sft")
    assert step_losses(base, "sft") == step_losses(chat.reference, "sft")


def test_sigterm_checkpoints_then_resume_on_two_processes_matches(chat, tmp_path):
    base = chat.volume(tmp_path / "volume")
    code, out = run_sft(base, chat.env, *ARGS, kill_when=lambda line: "step 00007/" in line,
                        sig=signal.SIGTERM)
    assert code == 0, out  # docker stop: finish the step, emergency checkpoint, exit 0
    assert "emergency checkpoint published" in out
    stopped = layout.latest(sft_dir(base))
    assert stopped.step >= 7 and stopped.step % 5 and not stopped.done
    code, out = run_sft(base, chat.env, *ARGS, nproc=2)
    assert code == 0, out
    assert f"resuming from step={stopped.step} " in out and "saved_world_size=1 world_size=2" in out
    reference, resumed = step_losses(chat.reference, "sft"), step_losses(base, "sft")
    assert sorted(resumed) == sorted(reference)
    # The loss is normalised over the global batch, so only the reduction order may differ.
    assert max(abs(reference[s] - resumed[s]) for s in reference) < 1e-5


def test_a_finished_sft_relaunch_exits_0_without_training(chat):
    metrics = chat.reference / "logs" / f"train_sft_{MODEL_TAG}.jsonl"
    before = metrics.read_bytes()
    code, out = run_sft(chat.reference, chat.env, *ARGS)
    assert code == 0, out
    assert f"sft stage already finished at step {STEPS}" in out and "step 00001/" not in out
    assert metrics.read_bytes() == before


def test_sft_without_a_finished_base_is_one_clear_error(chat, tmp_path):
    code, out = run_sft(tmp_path / "empty", chat.env, *ARGS)
    assert code == 2, out
    assert out.strip().splitlines()[-1].startswith(NO_BASE) and "Traceback" not in out

    base = chat.volume(tmp_path / "volume")
    # As if base training had been stopped: its latest checkpoint complete but not the final one.
    manifest_path = layout.latest(layout.stage_dir(base, "base", MODEL_TAG)).path / layout.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "done": False}))
    code, out = run_sft(base, chat.env, *ARGS)
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(NO_BASE) and "not marked done" in last
    assert "Traceback" not in out and not sft_dir(base).exists()


def test_a_volume_with_only_damaged_sft_checkpoints_refuses_to_start(chat, tmp_path):
    base = tmp_path / "volume"
    shutil.copytree(chat.reference, base)
    for step_dir in sft_dir(base).iterdir():
        (step_dir / layout.MANIFEST_NAME).unlink()
    code, out = run_sft(base, chat.env, *ARGS)
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--allow-fresh-start" in last and "Traceback" not in out


# --- in-process: batching and order ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [m["content"] for conversation in chat_conversations(400) for m in conversation]
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tokenizer"))


def test_targets_are_ignored_exactly_outside_assistant_tokens(tokenizer):
    two_turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color?"},
                 {"role": "assistant", "content": "The river is blue."},
                 {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
    malformed = [{"role": "assistant", "content": "an answer nobody asked for"}]
    conversations = [two_turns, *chat_conversations(12), malformed]
    rendered = [render(tokenizer, messages, row) for row, messages in enumerate(conversations)]
    for max_seq_len in (24, 256):  # shorter than some conversations (truncated), longer than all (padded)
        x, y = collate(rendered, tokenizer.bos_id, max_seq_len)
        width = min(max_seq_len, max(len(ids) for ids, _ in rendered) - 1)
        assert x.shape == y.shape == (len(conversations), width)
        for b, (ids, mask) in enumerate(rendered):
            ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
            for t in range(width):
                inside = t + 1 < len(ids)
                assert x[b, t] == (ids[t] if inside else tokenizer.bos_id)
                assert y[b, t] == (ids[t + 1] if inside and mask[t + 1] else -1), (max_seq_len, b, t)
    first = tokenizer.decode(y[0][y[0] != -1].tolist())
    assert first == "The river is blue.<|assistant_end|>You are welcome.<|assistant_end|>"
    assert (y[-1] == -1).all()  # the malformed conversation is skipped, not trained on


@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_order_is_global_and_resumes_exactly_from_its_state(tokenizer, world_size):
    conversations = chat_conversations(30)
    requested: list[int] = []

    def fetch(rows: list[int]) -> list:
        requested.extend(rows)
        return [conversations[r] for r in rows]

    def loaders(state: dict[str, int] | None = None) -> list[ChatLoader]:
        return [ChatLoader(fetch, 30, tokenizer, 6, 2, 64, rank, world_size, seed=1, state=state)
                for rank in range(world_size)]

    ranks = loaders()
    for _ in range(5):  # one epoch: 30 rows, 6 per step
        for loader in ranks:
            loader.next_step()
    # Ranks take consecutive slices of one global, shuffled order: the same for any world size.
    assert requested == [int(row) for row in epoch_order(30, 1, 0)] != list(range(30))
    assert ranks[0].state_dict() == {"epoch": 1, "index": 0}
    for _ in range(2):
        for loader in ranks:
            loader.next_step()
    for loader, restarted in zip(ranks, loaders(ranks[0].state_dict()), strict=True):
        a, b = loader.next_step(), restarted.next_step()
        assert a.num_targets == b.num_targets and len(a.micro_batches) == len(b.micro_batches)
        for (xa, ya), (xb, yb) in zip(a.micro_batches, b.micro_batches, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
