"""Manifests are written atomically; incomplete checkpoints are never resumed from."""

import json
import os

from r1pipeline import rundir


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "manifest.json"
    rundir.atomic_write_json(path, {"a": 1})
    rundir.atomic_write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert os.listdir(tmp_path) == ["manifest.json"], "no temporary file is left behind"


def test_content_hash_follows_names_and_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"123")
    first = rundir.content_hash(tmp_path / "a")
    assert rundir.content_hash(tmp_path / "a") == first
    (tmp_path / "a" / "w.bin").write_bytes(b"124")
    assert rundir.content_hash(tmp_path / "a") != first
    (tmp_path / "a" / "w.bin").write_bytes(b"123")
    (tmp_path / "a" / "w.bin").rename(tmp_path / "a" / "v.bin")
    assert rundir.content_hash(tmp_path / "a") != first


def test_config_hash_ignores_key_order():
    assert rundir.config_hash({"a": 1, "b": [1, 2]}) == rundir.config_hash({"b": [1, 2], "a": 1})
    assert rundir.config_hash({"a": 1}) != rundir.config_hash({"a": 2})


def test_only_complete_checkpoints_are_resumed(tmp_path):
    for step in (2, 4, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    rundir.mark_complete(tmp_path / "checkpoint-2")
    rundir.mark_complete(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"half a file")
    (tmp_path / "checkpoint-x").mkdir()
    assert rundir.latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert rundir.remove_incomplete_checkpoints(tmp_path) == [tmp_path / "checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-x"]


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert rundir.latest_complete_checkpoint(tmp_path) is None


def test_set_aside_keeps_old_outputs(tmp_path):
    stage = tmp_path / "sft"
    stage.mkdir()
    (stage / "manifest.json").write_text("{}")
    moved = rundir.set_aside(stage, "config changed")
    assert not stage.exists() and (moved / "manifest.json").read_text() == "{}"


def test_a_stage_config_hash_leaves_out_the_sampling_workers(tmp_path):
    """Worker processes share the same batches out (the same samples): a stage 3 done with one process is
    still done when the recipe asks for two, and every other sampling key still counts."""
    from r1pipeline.pipeline import Stage

    def digest(sampling: dict) -> str:
        recipe = {"model": {"preset": "tiny"}, "rejection": {"sampling": sampling, "max_steps": 5}}
        return rundir.config_hash(Stage("rejection", tmp_path, recipe, {}, "base").resolved_config())

    assert digest({"num_samples": 2}) == digest({"num_samples": 2, "workers": 2})
    assert digest({"num_samples": 2, "workers": 1}) == digest({"num_samples": 2, "workers": 2})
    assert digest({"num_samples": 2}) != digest({"num_samples": 4, "workers": 2})
