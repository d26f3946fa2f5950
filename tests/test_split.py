"""The split strategy: slices in the metadata, real saves on 4 ranks, loads on 4, 2 and 1 process(es)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import _split_fns as F  # noqa: E402
from _balance_plans import check_dedup, layouts  # noqa: E402

import dcplan  # noqa: E402
from dcplan import compat, workloads  # noqa: E402
from dcplan.compat import SavePlan, WriteItemType  # noqa: E402
from dcplan.save.index import PlanIndex  # noqa: E402
from dcplan.save.report import build_report  # noqa: E402
from dcplan.save.verify import find_violations  # noqa: E402
from dcplan.testing.plans import bytes_item, tensor_item  # noqa: E402
from dcplan.testing.pytest_plugin import gloo_pool_fixture  # noqa: E402
from dcplan_split import flat_range_boxes, split, water_level  # noqa: E402

WORLD = 4


# ------------------------------------------------------------------ pure planning
def test_water_level() -> None:
    assert water_level([0, 0, 0, 0], 100) == 25
    assert water_level([10, 0, 0, 0], 20) == 7  # three empty ranks take 7 each (21 >= 20)
    assert water_level([50, 0], 10) == 10
    assert water_level([5, 5], 0) == 5


def test_one_slice_per_holder_on_ddp() -> None:
    big = tensor_item("w", (1024, 16))  # 64 KiB
    plans = [SavePlan([big]) for _ in range(4)]
    out = split(plans, min_slice_bytes=1024, max_slices=64)
    check_dedup(plans, out)
    slices = [[(tuple(i.tensor_data.chunk.offsets), tuple(i.tensor_data.chunk.sizes)) for i in p.items] for p in out]
    assert slices == [[((0, 0), (256, 16))], [((256, 0), (256, 16))], [((512, 0), (256, 16))], [((768, 0), (256, 16))]]
    assert all(p.items[0].type == WriteItemType.SHARD for p in out)


def test_fixed_loads_and_small_items_are_respected() -> None:
    big = tensor_item("w", (1000, 4))  # 16000 B
    own = tensor_item("mine", (1000,))  # 4000 B only on rank 0
    small = bytes_item("obj", nbytes=10)
    plans = [SavePlan([big, own, small]), SavePlan([big, small])]
    out = split(plans, min_slice_bytes=64)
    check_dedup(plans, out)
    rep = build_report(plans, out)
    assert rep.busiest_bytes <= math.ceil((16000 + 4000 + 10) / 2) + 16  # within one row of the level
    assert rep.ratio <= 1.001


def test_min_slice_bytes_and_max_slices() -> None:
    big = tensor_item("w", (64, 4))  # 1 KiB
    plans = [SavePlan([big]) for _ in range(8)]
    # 8 holders would get 128 B each; slices of at least 300 B allow at most 3 slices
    out = split(plans, min_slice_bytes=300, max_slices=64)
    check_dedup(plans, out)
    n = sum(len(p.items) for p in out)
    assert 1 < n <= 3 and all(math.prod(i.tensor_data.chunk.sizes) * 4 >= 300 for p in out for i in p.items)
    out = split(plans, min_slice_bytes=1, max_slices=2)
    check_dedup(plans, out)
    assert sum(len(p.items) for p in out) == 2
    # too small to split at all: written whole by one holder
    out = split(plans, min_slice_bytes=4096)
    assert sum(len(p.items) for p in out) == 1 and out[0].items[0].type == WriteItemType.TENSOR


def test_replicated_shards_split_inside_their_chunk() -> None:
    # HSDP-like: a (40, 6) tensor sharded in two row blocks, each block replicated on two ranks
    lo = tensor_item("h", (40, 6), (0, 0), (20, 6))
    hi = tensor_item("h", (40, 6), (20, 0), (20, 6))
    plans = [SavePlan([lo]), SavePlan([hi]), SavePlan([lo]), SavePlan([hi])]
    out = split(plans, min_slice_bytes=8)
    check_dedup(plans, out)
    got = sorted((r, tuple(i.tensor_data.chunk.offsets), tuple(i.tensor_data.chunk.sizes))
                 for r, p in enumerate(out) for i in p.items)
    assert got == [(0, (0, 0), (10, 6)), (1, (20, 0), (10, 6)), (2, (10, 0), (10, 6)), (3, (30, 0), (10, 6))]


@st.composite
def _shape_and_range(draw: st.DrawFn) -> tuple[tuple[int, ...], int, int]:
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    n = math.prod(shape)
    a = draw(st.integers(0, n))
    return shape, a, draw(st.integers(a, n))


@settings(max_examples=300, deadline=None)
@given(_shape_and_range())
def test_flat_range_boxes_tile_the_range(case: tuple[tuple[int, ...], int, int]) -> None:
    shape, a, b = case
    boxes = flat_range_boxes(shape, a, b)
    assert len(boxes) <= 2 * (len(shape) - 1) + 1
    hits = torch.zeros(shape, dtype=torch.int32)
    for offs, sizes in boxes:
        assert len(offs) == len(sizes) == len(shape) and all(s >= 1 for s in sizes)
        assert all(0 <= o and o + s <= d for o, s, d in zip(offs, sizes, shape))
        view = hits
        for d, (o, sz) in enumerate(zip(offs, sizes)):
            view = view.narrow(d, o, sz)
        view += 1
    want = torch.zeros(math.prod(shape), dtype=torch.int32)
    want[a:b] = 1
    assert torch.equal(hits.reshape(-1), want)  # disjoint, and exactly the range
    # in flat order: each box starts where the previous one ended
    flat = [sum(o * math.prod(shape[d + 1:]) for d, o in enumerate(offs)) for offs, _ in boxes]
    ends = [f + math.prod(sz) for f, (_, sz) in zip(flat, boxes)]
    assert flat == sorted(flat) and all(e == f for e, f in zip(ends, flat[1:]))


def test_sub_row_cuts_balance_a_small_model_on_many_ranks() -> None:
    # 7 wide tensors of 2-5 rows on 64 ranks: row cuts alone would leave some ranks a whole extra row
    items = [tensor_item(f"w{i}", (2 + i % 4, 3, 500)) for i in range(7)]
    plans = [SavePlan(items) for _ in range(64)]
    out = split(plans)
    check_dedup(plans, out)
    idx = PlanIndex(plans)
    assert not find_violations(idx, out)
    rep = build_report(plans, out, index=idx)
    assert rep.busiest_bytes <= 1.005 * rep.divisible_bound
    # some slices are parts of a row (and of a 3 x 500 sub-block); no rank writes more than 5
    # rectangles of one tensor
    shapes = [tuple(i.tensor_data.chunk.sizes) for p in out for i in p.items]
    assert any(sz[0] == 1 and sz[1] < 3 for sz in shapes)
    for p in out:
        fqns = [i.index.fqn for i in p.items]
        assert all(fqns.count(f) <= 5 for f in fqns)
    # a coarse floor keeps row cuts: no slice is under the floor unless it is a whole item
    out = split(plans, min_slice_bytes=4000)
    check_dedup(plans, out)
    assert all(math.prod(i.tensor_data.chunk.sizes) * 4 >= 4000 for p in out for i in p.items)


@pytest.mark.parametrize("bad", [{"min_slice_bytes": 0}, {"max_slices": -1}, {"max_slices": 2.5}])
def test_bad_options_name_the_fix(bad: dict) -> None:
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        split([SavePlan([])], **bad)


@settings(max_examples=80, deadline=None)
@given(layouts(), st.integers(1, 512), st.integers(1, 8))
def test_split_writes_every_byte_once(plans: list[SavePlan], min_slice: int, max_slices: int) -> None:
    out = split(plans, min_slice_bytes=min_slice, max_slices=max_slices)
    check_dedup(plans, out)
    # no item cut into more than max_slices slices
    counts: dict[tuple, int] = {}
    for p in out:
        for i in p.items:
            counts[i.index.fqn] = counts.get(i.index.fqn, 0) + 1
    chunks_in = {(i.index.fqn, tuple(i.index.offset or ())) for p in plans for i in p.items}
    per_fqn_in: dict[str, int] = {}
    for fqn, _ in chunks_in:
        per_fqn_in[fqn] = per_fqn_in.get(fqn, 0) + 1
    for fqn, n in counts.items():
        assert n <= per_fqn_in[fqn] * max_slices


@pytest.mark.parametrize(
    "spec", [("ddp", "1b", 16), ("hsdp4", "125m", 16), ("tp2pp2dp4", "1b", None), ("fsdp", "125m", 8)],
    ids=lambda s: "-".join(map(str, s)),
)
def test_split_reaches_the_target_on_benchmark_layouts(spec: tuple) -> None:
    wl = workloads.make(*spec)
    out = dcplan.dedup(wl.plans, "split")
    rep = build_report(wl.plans, out)
    assert rep.ratio <= 1.01
    assert rep.busiest_bytes <= rep.divisible_bound * 1.01 + (1 << 20)


# ------------------------------------------------------------------ real processes

pool = gloo_pool_fixture(WORLD)


@pytest.fixture(scope="module")
def saved(pool, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("split") / "ck")
    return path, pool.run(F.save_split, path)


@pytest.mark.multiproc
def test_split_save_writes_slices_and_reloads_on_four_ranks(saved) -> None:
    path, results = saved
    assert all(r["loads"] == {"dcplan": True, "torch": True} for r in results)
    # "big" (64 x 33 fp32) and "wide" (3 x 5 x 200 fp32) are cut into slices written by different
    # ranks ("ints", 1000 int64, may go whole); a rank's slice of an N-D tensor is at most 2 * (N - 1) + 1 rectangles
    for fqn, shape in (("big", (64, 33)), ("ints", (1000,)), ("wide", (3, 5, 200))):
        parts = sorted(w for r in results for w in r["written"] if w[0] == fqn)
        assert (len(parts) > 1 or fqn == "ints") and all(w[1] == "SHARD" for w in parts[1:])
        assert sum(math.prod(w[3]) for w in parts) == math.prod(shape)
        assert all(len([w for w in r["written"] if w[0] == fqn]) <= 2 * len(shape) - 1 for r in results)
    # 3 rows for 4 ranks: some cut falls inside a row, and inside a (5 x 200) sub-block
    wide = [w for r in results for w in r["written"] if w[0] == "wide"]
    assert any(w[3][0] == 1 and w[3][1] < 5 for w in wide), wide
    report = results[0]["report"]
    assert report["strategy"] == "split" and report["ratio"] <= 1.01
    md = dcp.FileSystemReader(path).read_metadata()
    chunks = md.state_dict_metadata["big"].chunks
    assert sorted(tuple(c.offsets) for c in chunks) == sorted(w[2] for r in results for w in r["written"] if w[0] == "big")
    assert len(md.state_dict_metadata["row"].chunks) > 1  # split along dim 1
    assert len(md.state_dict_metadata["hsdp"].chunks) == WORLD  # 2 shards x 2 replicas' slices


@pytest.mark.multiproc
@pytest.mark.skipif(not compat.DCP_LOAD_ON_SUBGROUP,
                    reason="torch 2.4's dcp.load cannot load on a sub-group (_all_gather_keys uses the world size)")
def test_split_checkpoint_loads_on_two_ranks(pool, saved) -> None:
    path, _ = saved
    results = pool.run(F.load_on_two, path)
    assert results[:2] == [{"dcplan": True, "torch": True}] * 2


@pytest.mark.multiproc
def test_split_checkpoint_with_sub_row_cuts_loads_into_another_sharding(pool, saved) -> None:
    path, _ = saved
    assert pool.run(F.load_resharded, path) == [{"dcplan": True, "torch": True}] * WORLD


@pytest.mark.multiproc
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("loader", ["dcplan", "torch"])
def test_split_checkpoint_loads_in_one_process_without_a_process_group(saved, loader) -> None:
    path, _ = saved
    fresh = F.zero_state()
    lp = dcplan.LoadPlanner() if loader == "dcplan" else compat.torch_default_load_planner()
    dcp.load(fresh, checkpoint_id=path, planner=lp)
    assert F.same(fresh, F.full_state())
    assert fresh["ints"].dtype == torch.int64


@pytest.mark.multiproc
def test_bad_option_fails_on_every_rank_before_writing(pool, tmp_path) -> None:
    path = tmp_path / "bad"
    results = pool.run_expect_errors(F.save_bad_options, str(path))
    assert all(status == "err" and "min_slice_bytes" in str(value) for status, value in results)
    assert not path.exists() or not any(path.iterdir())


def test_past_the_flow_budget_split_falls_back_to_water_levels(monkeypatch) -> None:
    import dcplan_split

    monkeypatch.setattr(dcplan_split, "divisible_flow", lambda *a, **k: None)
    wl = workloads.make("hsdp4", "125m", 16)
    out = split(wl.plans, min_slice_bytes=4096)
    check_dedup(wl.plans, out)
    assert build_report(wl.plans, out).divisible_ratio <= 1.01
