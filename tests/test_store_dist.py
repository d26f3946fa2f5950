"""The persistent plan store (plan_cache_dir) across job restarts: two separate process pools."""

from __future__ import annotations

import glob
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _wire_fns as F  # noqa: E402

from dcplan.testing.procs import GlooPool  # noqa: E402

pytestmark = pytest.mark.multiproc
WORLD = 3


def _ok(res):
    return all(r["equal_dcplan"] and r["equal_torch"] for r in res)


def test_plan_store_survives_restart_and_never_serves_a_stale_plan(tmp_path):
    store = str(tmp_path / "plans")
    with GlooPool(WORLD, timeout=180) as job1:
        first = job1.run(F.store_save, str(tmp_path / "c1"), store)
    assert _ok(first) and first[0]["outcome"] == "miss"
    assert any("no stored plan" in m for m in first[0]["log"])
    files = glob.glob(os.path.join(store, "dcplan-plan-*"))
    assert len(files) == 1 and not glob.glob(os.path.join(store, ".dcplan-plan-*"))

    with GlooPool(WORLD, timeout=180) as job2:  # a restarted job: a fresh process pool
        hit = job2.run(F.store_save, str(tmp_path / "c2"), store)
        assert _ok(hit) and hit[0]["outcome"] == "hit"
        assert all(r["count"]["entries_sent"] == 0 for r in hit)  # only digests travelled
        assert sum(r["count"]["gathered"] for r in hit) < sum(r["count"]["gathered"] for r in first) / 2

        changed = job2.run(F.store_save, str(tmp_path / "c3"), store, True)  # a tensor added
        assert _ok(changed) and changed[0]["outcome"] == "miss"

        with open(files[0], "r+b") as f:  # corrupt the stored plan
            f.seek(20)
            f.write(b"garbage!")
        corrupt = job2.run(F.store_save, str(tmp_path / "c4"), store)
        assert _ok(corrupt) and corrupt[0]["outcome"] == "miss"
        assert any("corrupt" in m for m in corrupt[0]["log"]), corrupt[0]["log"]

        again = job2.run(F.store_save, str(tmp_path / "c5"), store)  # rewritten after the miss
        assert _ok(again) and again[0]["outcome"] == "hit"
