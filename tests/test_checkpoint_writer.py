"""The checkpoint writer (trainer.checkpoint): safetensors files hashed while they are written, and ranks
that write their own files into one checkpoint, published by rank 0 only once every rank's are in."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.helpers import checkpoint_meta, fill_checkpoint
from trainer import checkpoint_content as content
from trainer import checkpoint_layout as layout
from trainer.checkpoint import AsyncCheckpointer, CheckpointWriteError, write_safetensors
from trainer.distributed import Dist


def test_written_files_are_safetensors_own_bytes_and_hashed_on_the_way(tmp_path):
    tensors = {"w": torch.randn(64, 33), "adamw.wte.step": torch.tensor(17), "bf": torch.randn(5).bfloat16(),
               "rank0.torch_cpu": torch.randint(0, 255, (813,), dtype=torch.uint8), "empty": torch.zeros(0)}
    with ThreadPoolExecutor(1) as hasher:
        digest = write_safetensors(tmp_path / "ours.safetensors", tensors, hasher)
        assert write_safetensors(tmp_path / "none.safetensors", {}, hasher)
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "theirs.safetensors").read_bytes()
    assert digest == hashlib.sha256(ours).hexdigest()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    assert load_file(str(tmp_path / "none.safetensors")) == {}


def test_publish_takes_the_writers_entries_only_if_the_files_agree(tmp_path):
    tmp = layout.new_tmp_dir(tmp_path, 5)
    fill_checkpoint(tmp, 5)  # what a complete checkpoint needs beside the one part a writer reports
    save_file({"x": torch.ones(4)}, str(tmp / "part.safetensors"))
    size = (tmp / "part.safetensors").stat().st_size
    with pytest.raises(layout.CheckpointInvalid, match="its writer reported"):
        layout.publish(tmp, 5, {"part.safetensors": {"size": size + 1, "sha256": "0" * 64}})
    with pytest.raises(layout.CheckpointInvalid, match="reported finished by its writer but missing"):
        layout.publish(tmp, 5, {"other.safetensors": {"size": 8, "sha256": "0" * 64}})
    sha = layout.sha256_file(tmp / "part.safetensors")
    ckpt = layout.publish(tmp, 5, {"part.safetensors": {"size": size, "sha256": sha}})
    assert ckpt.files["part.safetensors"]["sha256"] == sha
    assert layout.verify(ckpt.path, full_hash=True).step == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_saves(rank: int, root: str, port: int) -> None:
    """One of two ranks: a save where rank 1's write fails, then one that succeeds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    d = Dist(rank, rank, 2, torch.device("cpu"), dist.new_group(backend="gloo"))
    checkpointer = AsyncCheckpointer(Path(root), 3, d, stage="base")
    outcome = {}
    share = {f"rank{rank}.state": torch.full((1000,), float(rank))}
    broken = {"rank1.state": torch.zeros(3, dtype=torch.complex64)}  # no safetensors dtype: the write fails
    for step, files in ((1, broken if rank == 1 else share), (2, share)):
        mine = {content.optimizer_share_name(rank, 2): files}
        if rank == 0:  # the rest of a complete checkpoint
            mine |= {"model.safetensors": {"w": torch.ones(2)}, "rng.safetensors": {"r": torch.ones(2)}}
        meta = checkpoint_meta(step, world_size=2, rng=[{}, {}]) if rank == 0 else None
        checkpointer.save(step, mine, meta)
        try:
            checkpointer.wait()
            outcome[step] = "ok"
        except CheckpointWriteError as exc:
            outcome[step] = str(exc)
    Path(root, f"outcome{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def test_a_rank_whose_write_fails_stops_the_publish_and_says_so(tmp_path):
    root = tmp_path / "base_checkpoints" / "tag"
    mp.spawn(two_rank_saves, args=(str(root), _free_port()), nprocs=2)
    outcomes = [json.loads((root / f"outcome{rank}.json").read_text()) for rank in (0, 1)]
    # Rank 1 knows its own error; rank 0, which publishes, names the rank that failed; nothing is published.
    assert "complex" in outcomes[1]["1"].lower() and "failed on rank 1" in outcomes[0]["1"]
    assert outcomes[0]["2"] == outcomes[1]["2"] == "ok"
    assert [c.step for c in layout.complete_checkpoints(root)] == [2]
    shares = [content.optimizer_share_name(r, 2) for r in (0, 1)]
    assert sorted(layout.latest(root).files) == sorted(["meta.json", "model.safetensors", "rng.safetensors",
                                                        *shares])
    assert not [p for p in root.iterdir() if p.name.startswith(layout.TMP_PREFIX)]
