"""Real dcp.save / dcp.load across real gloo processes (4 ranks, one pool per module)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _integ_fns as F  # noqa: E402

from dcplan.testing.pytest_plugin import gloo_pool_fixture  # noqa: E402

pytestmark = pytest.mark.multiproc
WORLD = 4


pool = gloo_pool_fixture(WORLD)


@pytest.mark.parametrize("strategy", ["size_balanced", "lowest_rank", "torch"])
@pytest.mark.parametrize("loader", ["dcplan", "torch"])
def test_ddp_replicated_state(pool, tmp_path, strategy, loader):
    results = pool.run(F.ddp_roundtrip, str(tmp_path / "ck"), strategy, loader)
    assert all(r["equal"] for r in results)
    written = [fqn for r in results for fqn in r["written"]]
    assert len(written) == len(set(written)), "each replicated item is written exactly once"
    report = results[0]["report"]
    assert report["strategy"] == strategy and len(report["bytes_per_rank"]) == WORLD
    if strategy == "lowest_rank":
        assert results[0]["written"] and all(r["written"] == [] for r in results[1:])


def test_torch_checkpoint_loads_with_dcplan(pool, tmp_path):
    assert all(pool.run(F.torch_writes_dcplan_reads, str(tmp_path / "ck")))


@pytest.mark.parametrize("loader", ["dcplan", "torch"])
def test_fsdp2_sharded_model(pool, tmp_path, loader):
    results = pool.run(F.fsdp2_roundtrip, str(tmp_path / "ck"), loader)
    assert all(r["equal"] for r in results)
    assert results[0]["types"] == ["DTensor"]


@pytest.mark.parametrize("strategy", ["size_balanced", "lowest_rank"])
def test_hsdp_2d_mesh_dedups_replicated_shards(pool, tmp_path, strategy):
    results = pool.run(F.hsdp_roundtrip, str(tmp_path / "ck"), strategy)
    assert all(r["equal"] for r in results)
    chunks = [c for r in results for c in r["chunks"]]
    assert len(chunks) == len(set(chunks)) == 4  # 2 shards of w + 2 shards of v, each written once


def test_dtensor_on_sub_mesh(pool, tmp_path):
    results = pool.run(F.submesh_roundtrip, str(tmp_path / "ck"))
    assert all(r["ok"] for r in results)
    assert [r["in_mesh"] for r in results] == [True, True, False, False]
    assert all("sub" not in r["local_items"] for r in results[2:])


def test_sharded_tensor_flattening(pool, tmp_path):
    assert all(pool.run(F.sharded_tensor_roundtrip, str(tmp_path / "ck")))


def test_async_save(pool, tmp_path):
    assert all(pool.run(F.async_roundtrip, str(tmp_path / "ck")))


def test_missing_keys_listed_on_every_rank(pool, tmp_path):
    errors = pool.run(F.expect_failure, str(tmp_path / "ck"), "missing_keys")
    for e in errors:
        assert "2 key(s) of the state dict are missing" in e
        assert "extra2" in e and "model.extra1" in e and "dcplan-partial-load" in e


def test_shape_mismatch_on_every_rank(pool, tmp_path):
    errors = pool.run(F.expect_failure, str(tmp_path / "ck"), "shape_mismatch")
    assert all("size mismatch" in e and "(2, 3)" in e and "(3, 2)" in e for e in errors)


@pytest.mark.parametrize("case,needle", [
    ("strategy_mismatch", "ranks disagree on the save strategy"),
    ("plugin_mismatch", "ranks disagree on the save strategy or plugin set"),
    ("bad_strategy", "written by rank 0 and rank 1"),
])
def test_refused_saves_write_nothing(pool, tmp_path, case, needle):
    path = tmp_path / "ck"
    errors = pool.run(F.expect_failure, str(path), case)
    assert all(needle in e for e in errors), errors
    assert [f for f in F.files_in(str(path)) if not f.startswith(".")] == []
    assert ".metadata" not in F.files_in(str(path))
