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

from bench.packing import long_tailed_chats
from entrypoint.demo.localhub import LocalHub
from tests.helpers import (
    MODEL_TAG,
    chat_conversations,
    plant_edited_checkpoint,
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

CONVERSATIONS = 200  # 32 held out (tiny preset), 168 to train on
STEPS = 58  # two passes of 168 at ~5.8 conversations a step (2 rows of 128 tokens, ~11% padding)
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
    # The horizon was estimated by packing the conversations: about two passes over the 168 training rows.
    assert abs(meta["conversations"] - 2 * 168) <= 0.05 * 2 * 168


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


def test_a_checkpoint_of_the_former_batches_is_refused_in_one_line(chat, tmp_path):
    """An SFT checkpoint from before packing (32 conversations a step, padded): its loader state was one
    position (rewritten here, with a valid manifest)."""
    base = chat.volume(tmp_path / "volume")
    old = next(c for c in layout.complete_checkpoints(sft_dir(chat.reference)) if not c.done)
    plant_edited_checkpoint(old, sft_dir(base), lambda meta: meta.update(loader={"epoch": 0, "index": 40}))
    code, out = run_sft(base, chat.env, *ARGS)
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and "SFT batches of '32 conversations a step" in last, last
    assert "redo SFT" in last and "Traceback" not in out


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


def test_rows_are_the_same_on_any_world_size_and_resume_exactly_mid_buffer(tokenizer):
    conversations = chat_conversations(30)
    requested: list[int] = []

    def fetch(rows: list[int]) -> list:
        requested.extend(rows)
        return [conversations[r] for r in rows]

    def loaders(world_size: int, state: dict | None = None) -> list[ChatLoader]:
        return [ChatLoader(fetch, 30, tokenizer, rows_per_step=4, device_batch_size=2, max_seq_len=64,
                           rank=rank, world_size=world_size, seed=1, state=state)
                for rank in range(world_size)]

    def step(ranks: list[ChatLoader]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [micro_batch for loader in ranks for micro_batch in loader.next_step().micro_batches]

    single, pair = loaders(1), loaders(2)
    for _ in range(4):
        expected = step(single)
        for (x, y), (xp, yp) in zip(expected, step(pair), strict=True):
            assert torch.equal(x, xp) and torch.equal(y, yp)
        for x, _ in expected:
            assert bool((x[:, 0] == tokenizer.bos_id).all())  # each row starts at a conversation
    # Conversations are read in one global, shuffled order: the same for any world size.
    assert requested[:30] == [int(row) for row in epoch_order(30, 1, 0)] != list(range(30))
    state = json.loads(json.dumps(pair[0].state_dict()))  # as meta.json holds it
    assert state == pair[1].state_dict() and state["buffer_back"]  # one state, conversations buffered
    for resumed in (loaders(1, state), loaders(2, state)):
        for _ in range(3):
            for (x, y), (xr, yr) in zip(step(single) if len(resumed) == 1 else step(pair), step(resumed),
                                        strict=True):
                assert torch.equal(x, xr) and torch.equal(y, yr)


def test_packed_rows_pad_under_5_percent_where_padding_to_the_longest_wasted_most(tokenizer):
    """Long-tailed chats (bench/packing.py's, a median of ~110 tokens here, 3% longer than a row) at T=512."""
    chats = long_tailed_chats(1200, median_words=12)
    loader = ChatLoader(lambda rows: [chats[r] for r in rows], len(chats), tokenizer, rows_per_step=16,
                        device_batch_size=8, max_seq_len=512, rank=0, world_size=1, seed=0)
    steps = [loader.next_step() for _ in range(60)]
    slots = sum(x.numel() for batch in steps for x, _ in batch.micro_batches)
    assert 1 - sum(batch.num_tokens for batch in steps) / slots <= 0.05
    # Every step fills its rows: conversations longer than a row are trained on, cut, and never pile up.
    assert min(batch.num_tokens for batch in steps) >= 0.9 * 16 * 512
    assert sum(batch.num_targets for batch in steps) == sum(int((y != -1).sum()) for batch in steps
                                                            for _, y in batch.micro_batches)
    rendered = [render(tokenizer, messages, row) for row, messages in enumerate(chats[:320])]
    padded = [collate(rendered[i:i + 16], tokenizer.bos_id, 512)[0] for i in range(0, 320, 16)]  # before
    useful = sum(min(len(ids), 513) - 1 for ids, _ in rendered)
    assert 1 - useful / sum(x.numel() for x in padded) > 0.5
