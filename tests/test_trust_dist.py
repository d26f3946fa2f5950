"""Issue 13 through real gloo saves: broken strategies and broken ranks give every rank a clear
error, nothing is written, and no rank waits (3 ranks, one pool)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _trust_fns as F  # noqa: E402

from dcplan.testing.pytest_plugin import gloo_pool_fixture  # noqa: E402

pytest.importorskip("dcplan_adversarial", reason="tests/plugins/dcplan-adversarial is not installed here "
                    "(tools/install_local.py --tests installs it)")
pytestmark = pytest.mark.multiproc
WORLD = 3

#: strategy -> what every rank's error must say
BROKEN = {
    "adv_drop": "no rank writes it (dropped",
    "adv_invent": "which no rank holds",
    "adv_misindex": "not its chunk offset",
    "adv_non_holder": "which it does not hold",
    "adv_overlap_slices": "overlap",
    "adv_dtype": "it is held as a float32 tensor",
    "adv_raising": "failed in dcplan_dedup: RuntimeError: adversarial strategy",
}


pool = gloo_pool_fixture(WORLD, env={"TEST_DCPLAN_ADVERSARIAL": "1"}, timeout=120)


def _nothing_written(results) -> None:
    for r in results:
        assert ".metadata" not in r["files"] and not [f for f in r["files"] if f.endswith(".distcp")], r["files"]


@pytest.mark.parametrize("strategy", sorted(BROKEN))
def test_broken_strategy_fails_on_every_rank_and_writes_nothing(pool, tmp_path, strategy):
    results = pool.run(F.adversarial_save, str(tmp_path / "ck"), strategy)
    for r in results:
        assert f"strategy {strategy!r} (distribution dcplan-adversarial)" in r["error"], r["error"]
        assert BROKEN[strategy] in r["error"], r["error"]
        assert r["seconds"] < 30
    _nothing_written(results)


def test_slow_strategy_is_still_correct(pool, tmp_path):
    results = pool.run(F.adversarial_save, str(tmp_path / "ck"), "adv_slow")
    assert [r["error"] for r in results] == ["no error"] * WORLD


@pytest.mark.parametrize("strategy", ["adv_mutate", "adv_fresh"])
def test_a_careless_strategy_cannot_corrupt_the_save(pool, tmp_path, strategy):
    # adv_mutate sorts the item lists it was given in place: the ranks' compact final plans are
    # positions into what they sent, so the core hands the strategy copies. adv_fresh drops every
    # rank's planner_data: the core keeps the flattening mappings in the metadata.
    results = pool.run(F.careless_strategy_save_load, str(tmp_path / "ck"), strategy)
    for r in results:
        assert r["error"] == "no error", r["error"]
        assert r["equal"] is True
        assert r["mapping"] == ["model", "w"]


def test_replicated_key_with_another_dtype_on_one_rank_fails_everywhere(pool, tmp_path):
    results = pool.run(F.disagreeing_dtype_save, str(tmp_path / "ck"))
    for r in results:
        assert "ranks disagree on key 'w': ranks [0, 1] have a float32 tensor" in r["error"], r["error"]
        assert "rank [2] has a bfloat16 tensor" in r["error"]
    _nothing_written(results)


@pytest.mark.parametrize("side", ["save", "load"])
def test_bad_config_on_one_rank_reaches_every_rank_quickly(pool, tmp_path, side):
    results = pool.run(F.bad_config_on_one_rank, str(tmp_path / "ck"), side)
    for r in results:
        assert "RankPlanningError" in r["error"] or "failed during planning on rank(s) 1" in r["error"], r["error"]
        assert "rank 1: ConfigError: DCPLAN_VALIDATE='junk' is not a boolean" in r["error"], r["error"]
        assert r["seconds"] < 10
    if side == "save":
        _nothing_written(results)
