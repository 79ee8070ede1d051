"""The torch-free checkpoint contract: what is complete, what is latest, what survives a crash."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers import SYNTHETIC_FILES, fill_checkpoint
from trainer import checkpoint_content as content
from trainer import checkpoint_layout as layout


def make_checkpoint(directory, step, payload=b"x", done=False):
    tmp = layout.new_tmp_dir(directory, step)
    save_file({"w": np.full((4, 4), step, dtype=np.float32)}, str(tmp / "model.safetensors"))
    fill_checkpoint(tmp, step, payload=payload.decode())
    return layout.publish(tmp, step, stage="base", model_tag="t", done=done)


def test_publish_writes_manifest_and_verifies(tmp_path):
    ckpt = make_checkpoint(tmp_path, 250)
    assert ckpt.path.name == "step_000250"
    assert set(ckpt.files) == set(SYNTHETIC_FILES)
    manifest = json.loads((ckpt.path / layout.MANIFEST_NAME).read_text())
    assert manifest["files"]["meta.json"]["sha256"] == layout.sha256_file(ckpt.path / "meta.json")
    assert layout.verify(ckpt.path, full_hash=True).step == 250
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(layout.TMP_PREFIX)]


def test_latest_is_highest_complete_step(tmp_path):
    for step in (5, 10, 15):
        make_checkpoint(tmp_path, step)
    assert layout.latest(tmp_path).step == 15
    # A later step that was never finished (no manifest) must not win, unlike `ls | sort | tail -1`.
    half = tmp_path / "step_000020"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert layout.latest(tmp_path).step == 15
    assert [c.step for c in layout.complete_checkpoints(tmp_path)] == [15, 10, 5]


def _corrupt_truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-7])


def _corrupt_flip_byte(path):
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))


def _corrupt_missing_manifest(path):
    (path / layout.MANIFEST_NAME).unlink()


def _corrupt_other_step(path):
    manifest = json.loads((path / layout.MANIFEST_NAME).read_text())
    manifest["step"] = 5
    (path / layout.MANIFEST_NAME).write_text(json.dumps(manifest))


def _corrupt_pickle(path):
    # A pickle where tensors should be, with a manifest that claims it is fine: refused by format.
    import pickle

    payload = pickle.dumps({"w": [1, 2, 3]})
    (path / "model.safetensors").write_bytes(payload)
    manifest = json.loads((path / layout.MANIFEST_NAME).read_text())
    manifest["files"]["model.safetensors"] = {"size": len(payload), "sha256": layout.sha256_file(
        path / "model.safetensors")}
    (path / layout.MANIFEST_NAME).write_text(json.dumps(manifest))


def _corrupt_extra_pickle_file(path):
    (path / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")


def _rehashed(path, meta_change=None, drop=()):
    """Wrong content hashed again, as a buggy writer would leave it: every sha256 matches."""
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **(meta_change or {})}))
    for name in drop:
        (path / name).unlink()
    (path / layout.MANIFEST_NAME).unlink()
    layout.write_manifest(path, 20, stage="base", model_tag="t")


def _corrupt_meta_missing_key(path):
    meta = json.loads((path / "meta.json").read_text())
    del meta["loader"]
    (path / "meta.json").write_text(json.dumps(meta))
    _rehashed(path)


def _corrupt_meta_wrong_type(path):
    _rehashed(path, {"world_size": "1"})


def _corrupt_meta_other_step(path):
    _rehashed(path, {"step": 10})


def _corrupt_manifest_lists_only_meta(path):
    _rehashed(path, drop=("model.safetensors", "optimizer.safetensors", "rng.safetensors"))


@pytest.mark.parametrize("corrupt,needle,needs_hash", [
    (_corrupt_truncate, "model.safetensors", False),
    (_corrupt_flip_byte, "model.safetensors", True),
    (_corrupt_missing_manifest, "MANIFEST.json", False),
    (_corrupt_other_step, "MANIFEST.json", False),
    (_corrupt_pickle, "model.safetensors", False),
    (_corrupt_extra_pickle_file, "optimizer.pt", False),
    (_corrupt_meta_missing_key, "meta.json: 'loader' is missing", False),
    (_corrupt_meta_wrong_type, "meta.json: 'world_size' is str, not int", False),
    (_corrupt_meta_other_step, "meta.json: written for step 10, not 20", False),
    (_corrupt_manifest_lists_only_meta, "MANIFEST.json: lists no model.safetensors", False),
])
def test_damaged_latest_is_skipped_with_a_warning_naming_the_file(tmp_path, caplog, corrupt, needle,
                                                                   needs_hash):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    corrupt(newest.path)
    with pytest.raises(layout.CheckpointInvalid, match=needle):
        layout.verify(newest.path, full_hash=True)
    with caplog.at_level("WARNING", logger="phoenix.checkpoint"):
        assert layout.latest(tmp_path, full_hash=True).step == 10
    assert needle in caplog.text
    if needs_hash:  # a flipped byte keeps the size: only sha256 can see it
        assert layout.latest(tmp_path, full_hash=False).step == 20


def test_safetensors_header_length_is_checked(tmp_path):
    ckpt = make_checkpoint(tmp_path, 1)
    target = ckpt.path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    target.write_bytes(bytes(data))
    with pytest.raises(layout.CheckpointInvalid, match="not a safetensors file"):
        layout.verify(ckpt.path)


def test_publish_refuses_to_overwrite_a_published_step(tmp_path):
    make_checkpoint(tmp_path, 7)
    with pytest.raises(FileExistsError):
        make_checkpoint(tmp_path, 7)


def test_clean_tmp_removes_only_temporaries(tmp_path):
    make_checkpoint(tmp_path, 3)
    leftover = layout.new_tmp_dir(tmp_path, 4)
    (leftover / "model.safetensors").write_bytes(b"half")
    assert layout.clean_tmp(tmp_path) == [leftover]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000003"]


def test_prune_keeps_last_and_never_the_only_complete(tmp_path):
    for step in (1, 2, 3, 4, 5):
        make_checkpoint(tmp_path, step)
    removed = layout.prune(tmp_path, keep_last=3, protect=[1])
    assert sorted(p.name for p in removed) == ["step_000002"]
    assert [c.step for c in layout.complete_checkpoints(tmp_path)] == [5, 4, 3, 1]
    # With the newest ones damaged, the only complete checkpoint survives any keep_last.
    for step in (5, 4, 3):
        (tmp_path / layout.step_dir_name(step) / layout.MANIFEST_NAME).unlink()
    assert layout.prune(tmp_path, keep_last=0) == []
    assert layout.latest(tmp_path).step == 1


def test_write_json_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "runs" / "run.json"
    layout.write_json_atomic(target, {"a": 1})
    layout.write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(target.parent) == ["run.json"]


def test_done_flag_round_trips(tmp_path):
    assert make_checkpoint(tmp_path, 9, done=True).done
    assert layout.latest(tmp_path).done


def test_damaged_steps_above_the_latest_good_one_go_to_quarantine(tmp_path):
    stage = layout.stage_dir(tmp_path, "base", "t")
    for step in (5, 10, 15):
        make_checkpoint(stage, step)
    _corrupt_flip_byte(stage / "step_000015")
    _corrupt_flip_byte(stage / "step_000005")  # below the good one: no save will collide with it
    assert layout.latest_or_quarantine(stage).step == 10
    assert [step for step, _ in layout.step_dirs(stage)] == [10, 5]
    (aside,) = (tmp_path / layout.QUARANTINE_DIR / "base_checkpoints" / "t").iterdir()
    assert aside.name.startswith("step_000015.") and (aside / "model.safetensors").is_file()
    make_checkpoint(stage, 15)  # the step can be published again

    lone = layout.stage_dir(tmp_path, "sft", "t")
    make_checkpoint(lone, 3)
    _corrupt_flip_byte(lone / "step_000003")
    assert layout.latest_or_quarantine(lone) is None  # nothing good: nothing moved, not our call
    assert [step for step, _ in layout.step_dirs(lone)] == [3]


def test_optimizer_state_is_one_gathered_file_or_every_share() -> None:
    share = content.optimizer_share_name
    assert content.optimizer_state_problem([content.GATHERED_OPTIMIZER]) is None
    assert content.optimizer_state_problem([share(0, 2), share(1, 2), "model.safetensors"]) is None
    assert share(1, 3) in content.optimizer_state_problem([share(0, 3), share(2, 3)])
    for names in ([], [share(0, 2), share(0, 1)], [content.GATHERED_OPTIMIZER, share(0, 1)]):
        assert content.optimizer_state_problem(names) is not None
