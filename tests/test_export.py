"""`phoenix export` → `phoenix chat --from`: the final model published to a Hub model repo and loaded back.

A module-scoped setup trains the tiny preset (base, then SFT) once; each test pushes to a fresh local Hub
with the real huggingface_hub client, as real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

from entrypoint.demo.localhub import LocalHub
from tests.helpers import MODEL_TAG, train_chat_model
from tests.test_engine import one_thread  # noqa: F401 (autouse: one torch thread)
from trainer import checkpoint_layout as layout
from trainer.checkpoint import load_tensors
from trainer.engine import Engine
from trainer.model import GPTConfig, model_from_weights

BASE_STEPS, SFT_STEPS = 20, 10
QUESTION = "What color is the apple?"


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    with LocalHub(root / "hub") as server:
        _, volume, _, _ = train_chat_model(server, root, BASE_STEPS, SFT_STEPS,
                                           base_args=("--eval-every", str(BASE_STEPS)))
    return volume


def phoenix(env: dict[str, str], volume: Path, *args: str) -> subprocess.CompletedProcess:
    environ = {**env, "NANOCHAT_BASE_DIR": str(volume), "MODEL_TAG": MODEL_TAG, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "entrypoint", *args], env=environ, capture_output=True,
                          text=True, timeout=180)


def test_export_then_chat_from_round_trips_on_the_local_hub(volume, hub, tmp_path):
    repo = f"{hub.user}/tiny-chat"
    eval_dir = volume / "runs" / MODEL_TAG / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "chat.json").write_text(json.dumps({"gsm8k": {"accuracy": 0.25}, "model": "sft",
                                                    "step": SFT_STEPS, "time": 1.7e9}))

    done = phoenix(hub.env, volume, "export", "--repo", repo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "event=export_done" in done.stdout and hub.token not in done.stdout + done.stderr
    api = HfApi(endpoint=hub.url, token=hub.token)
    assert api.repo_info(repo).private  # private unless --public
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "README.md", "config.json",
                                                 "model.safetensors", "tokenizer.json"]
    assert len(api.list_repo_commits(repo)) == 2  # the repo's creation, then the whole export in one commit
    card = (volume / "export" / MODEL_TAG / "README.md").read_text()
    assert f"| sft steps | {SFT_STEPS} |" in card and f"| base steps | {BASE_STEPS} |" in card
    sft_meta = layout.latest(layout.stage_dir(volume, "sft", MODEL_TAG)).meta()
    assert f"| sft conversations | {sft_meta['conversations']:,} |" in card
    assert "| base val bpb (best) |" in card and "| chat.gsm8k.accuracy | 0.25 |" in card
    assert f"phoenix chat --from {repo}" in card and "chat.time" not in card

    elsewhere = tmp_path / "other-volume"  # a machine with nothing but the export's name
    done = phoenix(hub.env, elsewhere, "chat", "--from", repo, "-p", QUESTION, "--temperature", "0",
                   "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert f"sft step {SFT_STEPS} of {MODEL_TAG} from {repo}" in done.stderr

    # The export holds exactly the volume's weights rounded to bf16, so greedy decoding the volume's
    # checkpoint through that same rounding must give the same tokens as `chat --from`.
    ckpt = layout.latest(layout.stage_dir(volume, "sft", MODEL_TAG))
    weights = load_tensors(ckpt, "model.safetensors")
    exported = load_file(str(elsewhere / "exported" / repo / "model.safetensors"))
    assert exported.keys() == weights.keys()
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], weights[k].bfloat16())
               for k in weights)
    rounded = model_from_weights(GPTConfig(**ckpt.meta()["model_config"]),
                                 {k: v.bfloat16() for k, v in weights.items()}, "cpu")
    engine = Engine(rounded, Engine.from_checkpoint(ckpt).tokenizer)
    prompt = engine.chat_prompt([{"role": "user", "content": QUESTION}])
    expected = engine.decode(engine.generate([prompt], 24)[0])
    assert expected.strip() and done.stdout == expected + "\n"


def test_export_refuses_the_checkpoint_store_a_bad_repo_and_an_empty_volume(hub, tmp_path):
    env = {**hub.env, "HF_REPO_ID": f"{hub.user}/checkpoints"}
    done = phoenix(env, tmp_path / "empty", "export", "--repo", f"{hub.user}/checkpoints")
    assert done.returncode == 2 and "is the checkpoint store HF_REPO_ID" in done.stderr
    done = phoenix(env, tmp_path / "empty", "export", "--repo", "no-namespace")
    assert done.returncode == 2 and done.stderr.startswith("error: --repo 'no-namespace' is not a repo id")
    done = phoenix(env, tmp_path / "empty", "export", "--repo", f"{hub.user}/tiny-chat")
    assert done.returncode == 2  # user errors exit 2, as everywhere (1 is a crash)
    assert done.stderr.startswith(f"error: no complete checkpoint of MODEL_TAG={MODEL_TAG}")
    assert done.stderr.count("\n") == 1
    assert not HfApi(endpoint=hub.url, token=hub.token).repo_exists(f"{hub.user}/tiny-chat")  # nothing made
