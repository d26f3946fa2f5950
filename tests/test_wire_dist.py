"""Compact plans and the digest exchange in real gloo saves (4 ranks, one pool)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _wire_fns as F  # noqa: E402

from dcplan.testing.pytest_plugin import gloo_pool_fixture  # noqa: E402

pytestmark = pytest.mark.multiproc
WORLD = 4


pool = gloo_pool_fixture(WORLD)


@pytest.mark.parametrize("kind", ["ddp", "sharded"])
def test_compact_save_reloads_bit_exact_with_both_loaders(pool, tmp_path, kind):
    ours = pool.run(F.save_load, str(tmp_path / "d"), kind, "dcplan")
    theirs = pool.run(F.save_load, str(tmp_path / "t"), kind, "torch")
    assert all(r["equal_dcplan"] and r["equal_torch"] for r in ours + theirs)
    written = [w for r in ours for w in r["written"]]
    assert len(written) == len(set(written))
    assert all(r["count"]["exchanged"] > 0 for r in ours)  # the exchange ran on the default group
    gathered = sum(r["count"]["gathered"] for r in ours)
    assert gathered < sum(r["count"]["gathered"] for r in theirs) * 0.7
    assert ours[0]["count"]["scattered"] < theirs[0]["count"]["scattered"] * 0.5
    if kind == "ddp":  # identical plans travel once
        assert ours[0]["count"]["entries_sent"] > 0
        assert all(r["count"]["entries_sent"] == 0 for r in ours[1:])
        assert all(r["count"]["gathered"] < 600 for r in ours[1:])


def test_planner_group_differs_from_dcp_group_falls_back(pool, tmp_path):
    res = pool.run(F.save_load, str(tmp_path / "c"), "ddp", "dcplan", "other")
    assert all(r["equal_dcplan"] and r["equal_torch"] for r in res)
    assert all(r["count"]["exchanged"] == 0 for r in res)  # no exchange: every rank sent its plan
    assert all(r["count"]["entries_sent"] > 0 for r in res)


def test_explicit_group_on_both_sides_exchanges(pool, tmp_path):
    res = pool.run(F.save_load, str(tmp_path / "c"), "ddp", "dcplan", "explicit")
    assert all(r["equal_dcplan"] and r["equal_torch"] for r in res)
    assert all(r["count"]["exchanged"] > 0 for r in res)
    assert all(r["count"]["entries_sent"] == 0 for r in res[1:])


def test_a_rank_failing_its_local_plan_fails_every_rank_without_a_hang(pool, tmp_path):
    res = pool.run(F.local_failure, str(tmp_path / "c"))
    assert all("broken local plan on rank 1" in r for r in res), res
    assert not os.path.exists(tmp_path / "c" / ".metadata")
