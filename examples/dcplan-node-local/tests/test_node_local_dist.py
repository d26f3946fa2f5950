"""node_local saves and loads for real: dcp.save / dcp.load on 4 gloo ranks ("2 nodes" of 2)."""

from __future__ import annotations

import pytest

from dcplan.testing.procs import GlooPool

import _node_local_fns as fns

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def pool():
    with GlooPool(world_size=4) as p:
        yield p


def test_save_and_load_on_four_ranks(pool, tmp_path):
    results = pool.run(fns.save_and_load, str(tmp_path / "ckpt"))
    assert [r["strategy"] for r in results] == ["node_local"] * 4
    who = results[0]["writers"]
    assert {who[f"model.layer{i}"] for i in range(4)} <= {0, 1}  # group {0..3} -> node 0
    assert {who["node1.w"], who["node1.b"]} <= {2, 3}  # group {2, 3} -> node 1
    assert who["pair"] == 1  # group {1, 2}: its coordinator (1) is on node 0
    assert who["step"] in (0, 1)
