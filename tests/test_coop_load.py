"""dcplan-coop-load: cooperative loads on real gloo processes, checked against torch's default load.

Every load is compared bit-exact (per rank) with torch's ``DefaultLoadPlanner`` on the same
checkpoint, and the bytes each rank reads are counted below the reader
(:class:`dcplan.testing.storage.MeteredFileSystemReader`).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

sys.path.insert(0, os.path.dirname(__file__))

import _coop_fns as fns  # noqa: E402

import dcplan  # noqa: E402
from dcplan import compat  # noqa: E402
from dcplan.testing.pytest_plugin import gloo_pool_fixture  # noqa: E402

pytest.importorskip("dcplan_coop_load")
from dcplan_coop_load.plan import SCHEDULE_KEY, plan_cooperative  # noqa: E402

WORLD = 4


pool = gloo_pool_fixture(WORLD)


@pytest.fixture(scope="module")
def ckpts(pool, tmp_path_factory):
    out = {}
    for layout in ("ddp", "hsdp", "tp", "fsdp"):
        path = str(tmp_path_factory.mktemp(f"coop-{layout}"))
        out[layout] = (path, pool.run(fns.save, path, layout), fns.read_once_bytes(path))
        assert out[layout][2] > 0, "the metered reader counted nothing: it no longer sits below torch's reader"
    return out


def _check(results, reference):
    for rank, (res, ref) in enumerate(zip(results, reference)):
        assert res["digest"] == ref["digest"], f"rank {rank} differs from torch's default load"


# ---------------------------------------------------------------- layouts
@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["ddp", "hsdp", "tp"])
def test_cooperative_reads_each_stored_byte_once(pool, ckpts, layout):
    path, saved, once = ckpts[layout]
    torch_res = pool.run(fns.load, path, layout, "torch")
    coop = pool.run(fns.load, path, layout, "cooperative")
    _check(coop, torch_res)
    assert [r["digest"] for r in coop] == saved  # and it is the saved state
    total = sum(r["bytes"] for r in coop)
    assert total == once, (total, once)  # every stored record read exactly once, by one rank
    default_total = sum(r["bytes"] for r in torch_res)
    assert default_total >= 1.9 * once  # replicas made the default load read it again
    if layout == "ddp":
        assert default_total == WORLD * once
        assert max(r["bytes"] for r in coop) <= 1.35 * once / WORLD  # balanced
    stats = coop[0]["stats"]
    assert stats["mode"] == "coop"
    assert [r["stats"] for r in coop] == [stats] * WORLD  # every rank holds the same report
    assert sum(stats["received_bytes"]) == sum(stats["sent_bytes"]) > 0
    assert all(s > 0 for s in stats["seconds"])
    assert [r["load_reports_logged"] for r in coop] == [1, 0, 0, 0]  # once, on the coordinator


@pytest.mark.multiproc
def test_fsdp_falls_back_to_plain_reads_and_says_so(pool, ckpts):
    path, saved, _ = ckpts["fsdp"]
    torch_res = pool.run(fns.load, path, "fsdp", "torch")
    coop = pool.run(fns.load, path, "fsdp", "cooperative")
    _check(coop, torch_res)
    assert [r["bytes"] for r in coop] == [r["bytes"] for r in torch_res]
    stats = coop[0]["stats"]
    assert stats["mode"] == "plain"
    assert "plain reads" in stats["reason"] and "min_saving" in stats["reason"]
    assert sum(stats["received_bytes"]) == 0


@pytest.mark.multiproc
def test_node_scope_shares_only_within_a_host(pool, ckpts):
    path, saved, once = ckpts["ddp"]
    coop = pool.run(fns.load, path, "ddp", "cooperative", {"scope": "node"}, host_of_rank=True)
    assert [r["digest"] for r in coop] == saved
    assert sum(r["bytes"] for r in coop) == 2 * once  # two hosts, each reads everything once
    stats = coop[0]["stats"]
    # ranks 0,1 are host h0 and 2,3 host h1: nobody sends across hosts
    assert stats["mode"] == "coop"


@pytest.mark.multiproc
def test_small_in_flight_limit_many_rounds_same_result(pool, ckpts):
    path, saved, once = ckpts["hsdp"]
    coop = pool.run(fns.load, path, "hsdp", "cooperative", {"max_in_flight": 2048})
    assert [r["digest"] for r in coop] == saved
    assert sum(r["bytes"] for r in coop) == once
    assert "round(s)" in coop[0]["stats"]["reason"]
    rounds = int(coop[0]["stats"]["reason"].split(" round(s)")[0].split()[-1])
    assert rounds > 10


# ---------------------------------------------------------------- resharding, partial, strict
@pytest.mark.multiproc
def test_resharding_load_into_other_placements(pool, ckpts):
    path, _, once = ckpts["hsdp"]  # saved [Replicate, Shard(0)] on a 2x2 mesh
    torch_res = pool.run(fns.load, path, "row", "torch")  # loaded as Shard(1) over 4 ranks
    coop = pool.run(fns.load, path, "row", "cooperative")
    _check(coop, torch_res)
    assert sum(r["bytes"] for r in coop) < sum(r["bytes"] for r in torch_res) / 2


@pytest.mark.multiproc
@pytest.mark.skipif(not compat.DCP_LOAD_ON_SUBGROUP, reason="torch 2.4 cannot dcp.load on a sub-group")
def test_save_on_four_load_on_two_and_back(pool, ckpts, tmp_path):
    path, _, _ = ckpts["hsdp"]
    torch_res = pool.run(fns.load, path, "full", "torch", two=True)
    coop = pool.run(fns.load, path, "full", "cooperative", two=True)
    _check(coop[:2], torch_res[:2])
    assert coop[0]["stats"]["mode"] == "coop" and len(coop[0]["stats"]["read_bytes"]) == 2
    # save on two ranks, load on four with other placements
    two = str(tmp_path / "two")
    pool.run(fns.save_on_two, two)
    torch_res = pool.run(fns.load, two, "tp", "torch")
    coop = pool.run(fns.load, two, "tp", "cooperative")
    _check(coop, torch_res)
    assert sum(r["bytes"] for r in coop) == fns.read_once_bytes(two)


@pytest.mark.multiproc
def test_partial_load_skip_policy(pool, ckpts):
    path, _, _ = ckpts["ddp"]
    kw = dict(drop=("big",), add=("not_in_checkpoint",), partial=True)
    default = pool.run(fns.load, path, "ddp", "default", **kw)
    coop = pool.run(fns.load, path, "ddp", "cooperative", **kw)
    _check(coop, default)
    for res in coop:
        assert "big" not in res["digest"]
        assert res["digest"]["not_in_checkpoint"] == fns.digest(torch.full((3,), 7.0))  # untouched
    assert sum(r["bytes"] for r in coop) < sum(r["bytes"] for r in default) / 2


@pytest.mark.multiproc
def test_strict_missing_keys_fail_on_every_rank(pool, ckpts):
    path, _, _ = ckpts["ddp"]
    for rank, msg in enumerate(pool.run(fns.strict_missing, path)):
        assert f"only_on_rank{rank}" in msg and "partial" in msg, msg


@pytest.mark.multiproc
def test_a_failing_rank_fails_the_load_everywhere_without_hanging(pool, ckpts):
    path, _, _ = ckpts["ddp"]
    for rank, msg in enumerate(pool.run(fns.load_failing, path)):
        assert "simulated storage failure" in msg, (rank, msg)


@pytest.mark.multiproc
def test_torch_reader_means_plain_reads(pool, ckpts):
    path, saved, _ = ckpts["ddp"]
    res = pool.run(fns.load_torch_reader, path)
    assert [r["digest"] for r in res] == saved
    assert all(r["stats"] is None for r in res)  # no finish_reads call, no exchange


# ---------------------------------------------------------------- planning, no processes
def _item(fqn: str, offset: tuple[int, ...], lengths: tuple[int, ...]) -> ReadItem:
    z = torch.Size([0] * len(offset))
    return ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(fqn, offset), dest_offsets=z,
                    storage_index=MetadataIndex(fqn, offset), storage_offsets=z, lengths=torch.Size(lengths))


def _metadata(n: int) -> compat.Metadata:
    md = {}
    for i in range(n):
        chunk = compat.ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([10 * (i + 1)]))
        md[f"t{i}"] = compat.TensorStorageMetadata(compat.TensorProperties(dtype=torch.float32),
                                                   torch.Size([10 * (i + 1)]), [chunk])
    return compat.Metadata(state_dict_metadata=md)


def _plans(world: int, n: int, hosts=None):
    from dcplan.load.strategy import LOAD_INFO_KEY, READER_KEY

    opts = (("scope", "world"), ("max_in_flight", 256 << 20), ("min_saving", 0.1))
    return [
        LoadPlan([_item(f"t{i}", (0,), (10 * (i + 1),)) for i in range(n)], planner_data={
            READER_KEY: True,
            LOAD_INFO_KEY: ("cooperative", {"host": (hosts or ["h"] * world)[r], "rank": r, "world": world,
                                            "options": opts, "cuda": False, "nccl": False}),
        })
        for r in range(world)
    ]


def test_plan_gives_each_shared_chunk_one_balanced_owner():
    out = plan_cooperative(_plans(4, 12), _metadata(12))
    scheds = [p.planner_data[SCHEDULE_KEY] for p in out]
    assert all(s.mode == "coop" for s in scheds) and all(p.items == [] for p in out)
    owners = {}
    for rank, s in enumerate(scheds):
        for rnd in s.rounds:
            for item in rnd.reads:
                assert item.storage_index.fqn not in owners
                owners[item.storage_index.fqn] = rank
    assert sorted(owners) == sorted(f"t{i}" for i in range(12))
    loads = [s.read_bytes for s in scheds]
    assert max(loads) - min(loads) <= 4 * 10 * 12  # LPT: within the largest chunk
    assert plan_cooperative(_plans(4, 12), _metadata(12)) == out  # deterministic


def test_plan_node_scope_and_fallbacks():
    out = plan_cooperative(_plans(4, 6, hosts=["a", "a", "b", "b"]), _metadata(6), scope="node")
    for rank, p in enumerate(out):
        for rnd in p.planner_data[SCHEDULE_KEY].rounds:
            peers = [d for d, ps in enumerate(rnd.send) if ps] + [s for s, ps in enumerate(rnd.recv) if ps]
            assert all(peer // 2 == rank // 2 for peer in peers)
    plans = _plans(2, 3)
    plans[1] = compat.replace_plan(plans[1], planner_data={k: v for k, v in plans[1].planner_data.items()
                                                           if k != "dcplan_finish_reads"})
    sched = plan_cooperative(plans, _metadata(3))[0].planner_data[SCHEDULE_KEY]
    assert sched.mode == "plain" and "finish_reads" in sched.reason and not sched.collect


def test_load_strategy_config_and_registry(monkeypatch):
    monkeypatch.setenv("DCPLAN_LOAD_STRATEGY", "cooperative")
    planner = dcplan.LoadPlanner()
    assert planner.load_strategy.name == "cooperative"
    assert planner.config_sources["load_strategy"].startswith("environment")
    assert planner.load_strategy_options["scope"] == "world"
    with pytest.raises(dcplan.UnknownStrategyError, match="load strategy 'nope'.*cooperative"):
        dcplan.LoadPlanner(load_strategy="nope")
    with pytest.raises(ValueError, match="scope must be one of"):
        dcplan.LoadPlanner(load_strategy_options={"scope": "rack"})
    pm = dcplan.get_plugin_manager()
    assert {"default", "cooperative"} <= set(pm.load_strategies)
    info = {i.name: i for i in pm.plugin_infos()}
    assert info["coop_load"].load_strategies == ("cooperative",)


def test_register_load_strategies_hook_names_both_on_a_clash():
    from dcplan.errors import PluginError
    from dcplan.manager import DcplanPluginManager

    class Mine:
        @dcplan.hookimpl
        def dcplan_register_load_strategies(self):
            return [dcplan.LoadStrategy(name="mine", func=lambda plans, planner: list(plans), description="x")]

    class Clash:
        @dcplan.hookimpl
        def dcplan_register_load_strategies(self):
            return [dcplan.LoadStrategy(name="cooperative", func=lambda plans, planner: list(plans))]

    pm = DcplanPluginManager(extra_plugins=[("mine", Mine())])
    assert pm.get_load_strategy("mine").description == "x"
    planner = dcplan.LoadPlanner(load_strategy="mine", plugin_manager=pm)
    assert planner.load_strategy.name == "mine"
    pm = DcplanPluginManager(extra_plugins=[("clash", Clash())])
    with pytest.raises(PluginError, match="load strategy 'cooperative' is registered twice.*dcplan-coop-load.*clash"):
        pm.get_load_strategy("cooperative")


def test_cli_lists_load_strategies_and_config(capsys, monkeypatch):
    from dcplan.cli.main import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "load strategy: cooperative - each stored byte" in out
    assert "load strategy: default - every rank reads" in out
    monkeypatch.setenv("DCPLAN_LOAD_STRATEGY_OPTIONS", '{"scope": "node"}')
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert 'load_strategy         = "default"' in out
    assert '"scope": "node"' in out and "environment (DCPLAN_*)" in out


@pytest.mark.slow
@pytest.mark.multiproc
def test_demo_shows_bytes_read_per_load_strategy(tmp_path):
    import subprocess

    demo = [sys.executable, "-c", "import sys; from dcplan.cli.main import main; sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.run([*demo, "demo", "--world-size", "4"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines() if ln.split()[:1] in (["default"], ["cooperative"])}
    totals = {k: int(v[5].replace(",", "")) for k, v in lines.items()}
    assert totals["cooperative"] * 3 < totals["default"]  # 4 ranks: mostly replicated state, read once
    assert "bit-exact" in " ".join(lines["cooperative"])
