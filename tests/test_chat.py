"""After training: samples in the training log, `phoenix chat` on the volume's model or the Hub's weights.

A module-scoped setup trains the tiny preset (base with samples every 10 steps and W&B offline, then SFT)
once, and a second base run without samples on the same data to compare weights against. Chat runs as
a real process; its greedy answers are compared with the engine run in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from entrypoint.demo.localhub import LocalHub
from tests.helpers import (
    MODEL_TAG,
    checkpoint_dir,
    run_trainer,
    seed_volume,
    step_losses,
    train_chat_model,
    weights_sha256,
)
from tests.test_engine import greedy_without_cache, one_thread  # noqa: F401 (autouse: one torch thread)
from trainer import checkpoint_layout as layout
from trainer.engine import Engine

BASE_STEPS, SFT_STEPS = 30, 20
QUESTION = "What color is the apple?"


@dataclass
class Trained:
    volume: Path  # finished base (sampled every 10 steps) and SFT
    base_out: str
    sft_out: str
    quiet: Path  # the same base run with sampling off


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("chat")
    with LocalHub(root / "hub") as server:
        env, volume, base_out, sft_out = train_chat_model(
            server, root, BASE_STEPS, SFT_STEPS, base_env={"WANDB_RUN": "samples"},
            base_args=("--sample-every", "10"), sft_args=("--sample-every", "10"))
        quiet = root / "quiet"
        seed_volume(volume, quiet)
        code, out = run_trainer(quiet, env, "--num-iterations", str(BASE_STEPS), "--eval-every", "0",
                                "--sample-every", "0")
        assert code == 0, out
        yield Trained(volume, base_out, sft_out, quiet)


def chat(volume: Path, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "NANOCHAT_BASE_DIR": str(volume), "MODEL_TAG": MODEL_TAG, "OMP_NUM_THREADS": "1",
               **env}
    return subprocess.run([sys.executable, "-m", "entrypoint", "chat", *args], env=environ, input=stdin,
                          capture_output=True, text=True, timeout=180)


def engine_of(volume: Path, stage: str) -> Engine:
    return Engine.from_checkpoint(layout.latest(layout.stage_dir(volume, stage, MODEL_TAG)))


def greedy_answer(engine: Engine, messages: list[dict[str, str]], max_tokens: int = 24) -> str:
    return engine.decode(engine.generate([engine.chat_prompt(messages)], max_tokens)[0])


def test_samples_are_logged_to_the_log_and_wandb_and_leave_the_weights_bit_identical(trained):
    lines = [line for line in trained.base_out.splitlines() if " | sample " in line]
    assert len(lines) == 3 * 4  # steps 10, 20, 30 (the last) x the four prompts, one line each
    assert any('step 00030 | sample "The capital of France is" -> "' in line for line in lines)
    assert ' | sample "What is the capital of France?" -> "' in trained.sft_out
    [table] = (trained.volume / "logs" / "wandb").glob("offline-run-*/files/media/table/samples_30_*.json")
    rows = json.loads(table.read_text())["data"]
    assert [row[0] for row in rows] == [10] * 4 + [20] * 4 + [30] * 4
    # Sampling is greedy on rank 0 with its own cache and no RNG: the trajectory is the unsampled one.
    assert weights_sha256(trained.volume, BASE_STEPS) == weights_sha256(trained.quiet, BASE_STEPS)
    assert step_losses(trained.volume) == step_losses(trained.quiet)


def test_greedy_decode_with_the_kv_cache_equals_full_recompute_on_the_trained_model(trained):
    engine = engine_of(trained.volume, "sft")
    questions = ["Hi", QUESTION, "Repeat after me: quiet rapid gentle ocean, and then say it again please"]
    prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 3
    batched = engine.generate(prompts, max_tokens=30)
    assert batched == [greedy_without_cache(engine.model, p, 30, engine.stop_ids) for p in prompts]
    assert all(batched)


def test_chat_p_answers_from_the_newest_sft_checkpoint(trained):
    done = chat(trained.volume, "-p", QUESTION, "--temperature", "0", "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert f"sft step {SFT_STEPS} of {MODEL_TAG}" in done.stderr
    expected = greedy_answer(engine_of(trained.volume, "sft"), [{"role": "user", "content": QUESTION}])
    assert expected.strip() and done.stdout == expected + "\n"


def test_interactive_chat_carries_the_conversation(trained):
    done = chat(trained.volume, "--temperature", "0", "--max-tokens", "24",
                stdin=f"{QUESTION}\nThank you!\n/quit\n")
    assert done.returncode == 0, done.stderr
    engine = engine_of(trained.volume, "sft")
    first = greedy_answer(engine, [{"role": "user", "content": QUESTION}])
    second = greedy_answer(engine, [{"role": "user", "content": QUESTION},
                                    {"role": "assistant", "content": first},
                                    {"role": "user", "content": "Thank you!"}])
    assert done.stdout.count("model> ") == 2
    assert f"model> {first}\n" in done.stdout and f"model> {second}\n" in done.stdout


def test_a_base_checkpoint_completes_text(trained, tmp_path):
    volume = tmp_path / "volume"
    shutil.copytree(trained.volume / "tokenizer", volume / "tokenizer")
    shutil.copytree(checkpoint_dir(trained.volume), checkpoint_dir(volume))
    done = chat(volume, "-p", "The capital of France is", "--temperature", "0", "--max-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert "base model: completes text" in done.stderr
    engine = engine_of(volume, "base")
    expected = engine.decode(engine.generate([engine.text_prompt("The capital of France is")], 12)[0])
    assert done.stdout == expected + "\n"


def test_nothing_to_load_is_one_error_line(tmp_path):
    done = chat(tmp_path / "empty", "-p", "hi")
    assert done.returncode == 2  # a user error, as everywhere (1 is a crash)
    assert done.stderr.startswith("error: no checkpoint of MODEL_TAG=") and done.stderr.count("\n") == 1


def test_user_errors_are_one_line_exit_2(hub, tmp_path):
    done = chat(tmp_path / "empty", "-p", "hi", "--max-tokens", "-5")
    assert done.returncode == 2
    assert done.stderr == "error: --max-tokens -5 is below 1: give --max-tokens 1 or more\n"
    # Reading an export asks for no write token: a private (or missing) one needs a token that can read it.
    done = chat(tmp_path / "empty", "-p", "hi", "--from", f"{hub.user}/private-export", HF_TOKEN="")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "HF_TOKEN is not set" in done.stderr and "a read token will do" in done.stderr
    assert "write" not in done.stderr


def test_chat_fetches_only_the_weights_from_the_hub_when_the_volume_has_none(trained, hub, tmp_path):
    repo = f"{hub.user}/checkpoints"
    empty = tmp_path / "empty"
    done = chat(empty, "-p", QUESTION, **hub.env, HF_REPO_ID=repo)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: no checkpoint of MODEL_TAG={MODEL_TAG}") and repo in done.stderr

    pushed = tmp_path / "pushed"
    shutil.copytree(trained.volume, pushed)
    sync = subprocess.run([sys.executable, "-m", "entrypoint", "sync", "--once"], capture_output=True,
                          text=True, env={**hub.env, "NANOCHAT_BASE_DIR": str(pushed), "MODEL_TAG": MODEL_TAG,
                               "HF_REPO_ID": repo}, timeout=180)
    assert sync.returncode == 0, sync.stdout + sync.stderr

    done = chat(empty, "-p", QUESTION, "--temperature", "0", "--max-tokens", "24", **hub.env, HF_REPO_ID=repo)
    assert done.returncode == 0, done.stderr
    assert f"sft step {SFT_STEPS} of {MODEL_TAG} from {repo}" in done.stderr
    expected = greedy_answer(engine_of(trained.volume, "sft"), [{"role": "user", "content": QUESTION}])
    assert done.stdout == expected + "\n"  # the same float32 weights
    files = sorted(str(p.relative_to(empty)) for p in empty.rglob("*") if p.is_file())
    step = f"weights/sft_checkpoints/{MODEL_TAG}/{layout.step_dir_name(SFT_STEPS)}"
    # No optimizer, nothing training could mistake for a checkpoint to resume from; and the fetches' lock.
    assert files == ["tokenizer/tokenizer.json", f"{step}/MANIFEST.json", f"{step}/meta.json",
                     f"{step}/model.safetensors", f"weights/{MODEL_TAG}.lock"]
