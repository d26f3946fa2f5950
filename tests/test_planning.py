"""Pure planning logic: plans in, plans out, no processes."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dcplan
from dcplan import compat
from dcplan.compat import ChunkStorageMetadata, TensorProperties
from dcplan.errors import PlanMismatchError, PlanValidationError
from dcplan.gcpause import paused_gc
from dcplan.save import validate as validate_mod
from dcplan.save.metadata import build_global_plan
from dcplan.save.validate import validate_global_plan
from dcplan.testing.plans import bytes_item, plan, replicated_plans, tensor_item


def _metadata(chunks, size):
    plans = [plan([tensor_item("w", size, c[0], c[1], shard=len(chunks) > 1)]) for c in chunks]
    gp, md, errors = build_global_plan(plans)
    assert not errors
    return gp, md


def _grid(size, splits):
    """Chunks of a regular grid splitting ``size`` into ``splits`` parts per dim."""
    per_dim = []
    for n, k in zip(size, splits):
        step = -(-n // k)
        per_dim.append([(o, min(step, n - o)) for o in range(0, n, step)])
    chunks = [((), ())]
    for dim in per_dim:
        chunks = [(off + (o,), sz + (s,)) for off, sz in chunks for o, s in dim]
    return chunks


@pytest.mark.parametrize("splits", [(1, 64), (64, 1), (8, 8), (3, 5)])
def test_valid_grid_layouts(splits):
    gp, md = _metadata(_grid((64, 64), splits), (64, 64))
    assert validate_global_plan(gp, md) == []
    assert compat.torch_validate_global_plan(gp, md) == []


def test_overlap_detected_in_grid():
    chunks = _grid((8, 8), (2, 2))
    chunks.append(chunks[0])
    plans = [plan([tensor_item("w", (8, 8), c[0], c[1])]) for c in chunks]
    gp, md, errors = build_global_plan(plans)
    assert any("written twice" in e for e in errors)


def test_overlap_detected_irregular():
    chunks = [((0, 0), (4, 8)), ((2, 2), (4, 4)), ((6, 0), (2, 8)), ((4, 0), (2, 2)), ((4, 6), (2, 2))]
    gp, md = _metadata(chunks, (8, 8))
    errors = validate_global_plan(gp, md)
    assert any("overlapping" in e for e in errors)
    assert compat.torch_validate_global_plan(gp, md)


def test_out_of_bounds_and_coverage():
    gp, md = _metadata([((0,), (4,)), ((4,), (5,))], (8,))
    assert any("out of bounds" in e for e in validate_global_plan(gp, md))
    gp, md = _metadata([((0,), (4,)), ((5,), (3,))], (8,))
    assert any("invalid fill" in e for e in validate_global_plan(gp, md))


def test_single_plan_skips_coverage_like_torch():
    gp, md = _metadata([((0,), (4,))], (8,))
    assert validate_global_plan(gp, md) == []


def test_shard_along_non_largest_dim_uses_grid_path():
    # Shard(1) of a tall matrix with many chunks: torch's sweep is quadratic here; ours is a dict lookup.
    n = 4096
    chunks = [((0, i), (8192, 1)) for i in range(n)]
    gp, md = _metadata(chunks, (8192, n))
    assert validate_global_plan(gp, md) == []


@st.composite
def _layouts(draw):
    size = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    chunks = []
    for _ in range(draw(st.integers(1, 8))):
        o0 = draw(st.integers(0, size[0] - 1))
        o1 = draw(st.integers(0, size[1] - 1))
        s0 = draw(st.integers(1, size[0] - o0))
        s1 = draw(st.integers(1, size[1] - o1))
        chunks.append(((o0, o1), (s0, s1)))
    if draw(st.booleans()):
        chunks = _grid(size, (draw(st.integers(1, 4)), draw(st.integers(1, 4))))
    return size, chunks


@settings(max_examples=300, deadline=None)
@given(_layouts())
def test_validation_agrees_with_torch(layout):
    size, chunks = layout
    plans = [plan([tensor_item("w", size, c[0], c[1], shard=len(chunks) > 1)]) for c in chunks]
    if len({c[0] for c in chunks}) != len(chunks):
        return  # same offset twice is a duplicate item, caught by build_global_plan
    gp, md, errors = build_global_plan(plans)
    assert not errors
    ours = validate_global_plan(gp, md)
    theirs = compat.torch_validate_global_plan(gp, md)
    if len(plans) == 1 and compat.torch_checks_single_plan_coverage():
        return  # torch < 2.9 also checks coverage of one-plan (rank-local) saves; dcplan follows 2.9+
    assert bool(ours) == bool(theirs), (ours, theirs)


@settings(max_examples=300, deadline=None)
@given(_layouts(), st.integers(0, 40))
def test_numpy_chunk_check_agrees_with_the_exact_check(layout, extra):
    """Tensors with many chunks take the numpy path: same verdict as the exact per-chunk check."""
    size, chunks = layout
    if extra and len(chunks) > 1:  # more chunks: repeat some (overlaps) or push one out of bounds
        chunks = chunks + chunks[: extra % len(chunks)]
        if extra % 3 == 0:
            chunks = chunks + [((size[0], 0), (1, size[1]))]
    metadata = compat.Metadata(state_dict_metadata={
        "w": compat.TensorStorageMetadata(
            properties=TensorProperties(dtype=torch.float32), size=torch.Size(size),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(z)) for o, z in chunks],
        )
    })
    gp = [plan([]), plan([])]
    fast = validate_mod._fast_chunk_check(metadata.state_dict_metadata["w"].chunks, size)
    old = validate_mod._NUMPY_MIN_CHUNKS
    try:
        validate_mod._NUMPY_MIN_CHUNKS = 10**9
        exact = validate_global_plan(gp, metadata)
        validate_mod._NUMPY_MIN_CHUNKS = 2
        mixed = validate_global_plan(gp, metadata)
    finally:
        validate_mod._NUMPY_MIN_CHUNKS = old
    assert bool(mixed) == bool(exact), (mixed, exact)
    if fast is not None:  # the numpy path only vouches for chunks that are in bounds and disjoint
        assert not [e for e in exact if "invalid fill" not in e]
        assert fast == sum(math.prod(z) for _, z in chunks)


def test_build_global_plan_errors():
    a = tensor_item("w", (4,), dtype=torch.float32)
    b = tensor_item("w", (4,), dtype=torch.int64)
    _, _, errors = build_global_plan([plan([a]), plan([b])])
    assert any("dtype torch.float32 on rank 0 but torch.int64 on rank 1" in e for e in errors)
    _, _, errors = build_global_plan([plan([a]), plan([a])])
    assert any("written by rank 0 and rank 1" in e for e in errors)
    _, _, errors = build_global_plan([plan([bytes_item("o")]), plan([bytes_item("o")])])
    assert any("written by rank 0 and rank 1" in e for e in errors)


def test_build_global_plan_rewrites_hints_and_merges_mappings():
    p0 = compat.replace_plan(plan([tensor_item("w", (4,), (0,), (2,))]), planner_data={"w": ("w",)})
    p1 = compat.replace_plan(plan([tensor_item("w", (4,), (2,), (2,)), bytes_item("x.y")]), planner_data={"x.y": ("x", "y")})
    gp, md, errors = build_global_plan([p0, p1])
    assert not errors
    assert [i.index.index for i in gp[1].items if i.tensor_data] == [1]
    assert md.planner_data == {"w": ("w",), "x.y": ("x", "y")}
    assert len(md.state_dict_metadata["w"].chunks) == 2


# ---------------------------------------------------------------- dedup
def _random_plans(seed, world=6, items=30, ties=False):
    rng = random.Random(seed)
    all_items = []
    for i in range(items):
        size = (4,) if ties else (rng.randint(1, 50), rng.randint(1, 5))
        if rng.random() < 0.1:
            all_items.append(bytes_item(f"obj{i}"))
        else:
            all_items.append(tensor_item(f"t{i}", size))
    plans = []
    for _ in range(world):
        plans.append(plan([it for it in all_items if rng.random() < 0.6]))
    return plans


def _owners(plans):
    return {(i.index.fqn, tuple(i.index.offset or ())): r for r, p in enumerate(plans) for i in p.items}


@pytest.mark.parametrize("seed", range(30))
def test_size_balanced_torch_mode_matches_torch(seed):
    # With ranks < 8, a Python set of ranks iterates in ascending order, so torch's set-order
    # tie-break coincides with dcplan's lowest-rank rule and the owners must be identical.
    plans = _random_plans(seed, world=6, ties=seed % 3 == 0)
    assert _owners(dcplan.dedup(plans, "size_balanced", mode="torch")) == _owners(compat.torch_dedup_save_plans(plans))


def test_size_balanced_torch_mode_ties_go_to_lowest_rank():
    # {2, 9}: torch picks rank 9 (set order); dcplan picks the lowest rank, 2.
    plans = [plan([]) for _ in range(10)]
    item = tensor_item("w", (4,))
    plans[2] = plan([item])
    plans[9] = plan([item])
    assert _owners(compat.torch_dedup_save_plans(plans))[("w", (0,))] == 9
    assert _owners(dcplan.dedup(plans, "size_balanced", mode="torch"))[("w", (0,))] == 2


def test_lowest_rank_matches_torch_save_to_lowest_rank():
    for seed in range(10):
        plans = _random_plans(seed)
        assert _owners(dcplan.dedup(plans, "lowest_rank")) == _owners(
            compat.torch_dedup_save_plans(plans, save_to_lowest_rank=True)
        )


@pytest.mark.parametrize("strategy", ["size_balanced", "lowest_rank", "torch"])
def test_dedup_does_not_mutate_and_writes_each_item_once(strategy):
    plans = _random_plans(3)
    before = copy.deepcopy(plans)
    out = dcplan.dedup(plans, strategy)
    assert plans == before
    assert out is not plans and len(out) == len(plans)
    owners = [(i.index.fqn, r) for r, p in enumerate(out) for i in p.items]
    keys = [k for k, _ in owners]
    assert len(keys) == len(set(keys)) == len({i.index.fqn for p in plans for i in p.items})
    for fqn, r in owners:
        assert fqn in {i.index.fqn for i in plans[r].items}


def test_dedup_unknown_option():
    with pytest.raises(ValueError, match="valid options"):
        dcplan.dedup(replicated_plans(2, [tensor_item("w", (2,))]), "lowest_rank", mode="x")


# ---------------------------------------------------------------- the planner protocol in one process
def _drive(planners, state_dicts):
    """Run torch's save protocol by hand: local plans, coordinator, finish."""
    for r, (p, sd) in enumerate(zip(planners, state_dicts)):
        p.set_up_planner(sd, None, r == 0)
    local = [p.create_local_plan() for p in planners]
    central, md = planners[0].create_global_plan(local)
    finals = [p.finish_plan(c) for p, c in zip(planners, central)]
    return finals, md


def test_protocol_in_process_dedups_replicated_state():
    sd = {"a": torch.zeros(10), "nested": {"b": torch.ones(3, 3), "n": 5}}
    planners = [dcplan.SavePlanner(strategy="lowest_rank") for _ in range(3)]
    finals, md = _drive(planners, [sd] * 3)
    assert [len(f.items) for f in finals] == [3, 0, 0]
    assert md.planner_data == {"a": ("a",), "nested.b": ("nested", "b"), "nested.n": ("nested", "n")}
    assert planners[0].report.busiest_rank == 0
    for f in finals:
        assert f.planner_data is None


def test_set_up_planner_accepts_two_argument_form():
    p = dcplan.SavePlanner()
    p.set_up_planner({"a": torch.zeros(1)}, True)
    assert p.is_coordinator is True and p.storage_meta is None


def test_ranks_with_different_strategies_are_refused():
    sd = {"a": torch.zeros(10)}
    planners = [dcplan.SavePlanner(strategy="lowest_rank"), dcplan.SavePlanner(strategy="size_balanced")]
    with pytest.raises(PlanMismatchError, match="rank 1: strategy=size_balanced"):
        _drive(planners, [sd, sd])


def test_ranks_with_different_options_are_refused():
    sd = {"a": torch.zeros(10)}
    planners = [dcplan.SavePlanner(strategy="torch"), dcplan.SavePlanner(strategy="torch", strategy_options={"save_to_lowest_rank": True})]
    with pytest.raises(PlanMismatchError, match="save_to_lowest_rank"):
        _drive(planners, [sd, sd])


def test_bad_strategy_output_is_refused_before_writing():
    def twice(all_plans):
        return list(all_plans)  # keeps every replica: each item written by every holder

    pm = dcplan.manager.DcplanPluginManager(env={})
    pm.register(type("P", (), {"dcplan_register_strategies": dcplan.hookimpl(lambda self: [dcplan.Strategy("twice", twice)])})(), "twice-plugin")
    planners = [dcplan.SavePlanner(strategy="twice", plugin_manager=pm) for _ in range(2)]
    with pytest.raises(PlanValidationError, match="written by rank 0 and rank 1.*nothing was written|nothing was written.*written by rank 0 and rank 1"):
        _drive(planners, [{"a": torch.zeros(2)}] * 2)


def test_paused_gc_restores_the_collector_and_respects_frozen_objects():
    import gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():  # re-entrant
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # an application that froze objects itself (e.g. before fork) keeps them frozen
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with paused_gc():
            kept = [[i] for i in range(1000)]
        # neither unfrozen nor frozen further (freezing would add the 1,001 lists still alive); a few
        # frozen objects may die by reference counting meanwhile (another thread, a finalizer), which
        # lowers the count by itself
        assert frozen - 100 <= gc.get_freeze_count() <= frozen and gc.isenabled()
        assert len(kept) == 1000
    finally:
        gc.unfreeze()


@st.composite
def _many_tensors(draw):
    """Several tensors of ranks 1-3: grids, overlaps, out-of-bounds, zero-size and wrong-rank chunks."""
    tensors = []
    for _ in range(draw(st.integers(1, 6))):
        dims = draw(st.integers(1, 3))
        size = tuple(draw(st.integers(0 if dims > 1 else 1, 9)) for _ in range(dims))
        chunks = []
        wild = draw(st.integers(0, 3)) == 0  # out-of-bounds and negative values too
        for _ in range(draw(st.integers(1, 10))):
            if wild:
                off = tuple(draw(st.integers(-1, max(s, 0))) for s in size)
                sz = tuple(draw(st.integers(-1, max(s, 0) + 1)) for s in size)
            else:  # in bounds: disjoint, overlapping, or not on one grid
                off = tuple(draw(st.integers(0, max(s - 1, 0))) for s in size)
                sz = tuple(draw(st.integers(0, max(s - o, 0))) for s, o in zip(size, off))
            chunks.append((off, sz))
        if draw(st.booleans()) and all(size):
            chunks = _grid(size, tuple(draw(st.integers(1, 3)) for _ in size))
            if draw(st.booleans()):
                chunks.append(chunks[draw(st.integers(0, len(chunks) - 1))])
        if draw(st.integers(0, 9)) == 0:
            chunks.append(((0,) * (dims + 1), (1,) * (dims + 1)))  # a chunk of another rank
        if draw(st.integers(0, 19)) == 0:
            chunks.append(((2**70,) * dims, (1,) * dims))  # beyond int64
        tensors.append((
            [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(z)) for o, z in chunks], size
        ))
    return tensors


@settings(max_examples=300, deadline=None)
@given(_many_tensors(), st.sampled_from([1, 5, 12, 8192]))
def test_batched_chunk_checks_agree_with_one_tensor_at_a_time(tensors, batch):
    _check_batched(tensors, batch)


def test_batched_chunk_checks_known_cases():
    def t(size, chunks):
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(z)) for o, z in chunks], size

    tensors = [
        t((8,), [((0,), (4,)), ((4,), (4,))]),  # a grid: volume 8
        t((8,), [((0,), (4,)), ((2,), (4,))]),  # overlapping, not on one grid: None (the sweep decides)
        t((8,), [((0,), (4,)), ((0,), (4,))]),  # two chunks in one cell: None
        t((8,), [((0,), (4,)), ((6,), (4,))]),  # out of bounds: None
        t((4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))]),  # 2-D grid: 16
        t((4, 4), [((0, 0), (2, 4)), ((0, 0), (2, 4, 1))]),  # a chunk of another rank: None
    ]
    for batch in (1, 3, 8192):
        got = _check_batched(tensors, batch)
        assert got == [8, None, None, None, 16, None]


def _check_batched(tensors, batch):
    """The batched numpy check gives each tensor the per-tensor check's answer (volume or None).

    A value beyond int64 sends the tensor to the exact check (``None``), which
    handles Python ints of any size.
    """
    one_by_one = [validate_mod._one_fast_check(chunks, size) for chunks, size in tensors]
    old = validate_mod._BATCH_CHUNKS
    try:
        validate_mod._BATCH_CHUNKS = batch  # small batches: tensors split over several numpy passes
        got = validate_mod._fast_chunk_checks(tensors)
    finally:
        validate_mod._BATCH_CHUNKS = old
    assert got == one_by_one
    return got
