"""Plan caching without processes: N simulated ranks drive the real planner protocol.

Each simulated rank has its own :class:`dcplan.SavePlanner` and its own
:class:`dcplan.save.cache.CacheStore`; plans travel through ``pickle`` (as gloo's
gather/scatter do) and torch's real ``FileSystemWriter.prepare_global_plan``.
A cold planner (no cache) runs the same saves side by side: the cached run must
produce exactly its global plan, metadata and final plans.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import Any

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemWriter

import dcplan
from dcplan import compat
from dcplan.errors import PlanValidationError
from dcplan.manager import DcplanPluginManager, hookimpl
from dcplan.save.cache import (
    CacheAck,
    CacheMsg,
    CacheStore,
    PlanCache,
    PlanCacheError,
    default_namespace,
    plan_fingerprint,
)
from dcplan.save.local import create_local_save_plan
from dcplan.save.planner import RankPayload
from dcplan.testing.plans import tensor_item

# ----------------------------------------------------------------- simulation


@attrs.frozen
class Shard:
    """A state-dict value standing for this rank's shard of a sharded tensor."""

    size: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype


class ShardPlugin:
    """Local plans for states holding :class:`Shard` values (a plugin, through the real hook)."""

    def __init__(self) -> None:
        self.dedup_calls = 0
        self.validate_calls = 0
        self.reports: list[Any] = []

    @hookimpl
    def dcplan_create_local_save_plan(self, planner: Any, state_dict: dict[str, Any], is_coordinator: bool) -> Any:
        plain = {k: v for k, v in state_dict.items() if not isinstance(v, Shard)}
        plan = create_local_save_plan(plain)
        shards = [
            tensor_item(k, v.size, v.offsets, v.sizes, dtype=v.dtype)
            for k, v in state_dict.items()
            if isinstance(v, Shard)
        ]
        return compat.replace_plan(plan, items=list(plan.items) + shards)

    @hookimpl
    def dcplan_dedup(self, all_plans: Any, strategy: Any, options: Any, config: Any) -> None:
        self.dedup_calls += 1

    @hookimpl
    def dcplan_validate_global_plan(self, global_plan: Any, metadata: Any) -> list[str]:
        self.validate_calls += 1
        return []

    @hookimpl
    def dcplan_plan_report(self, report: Any, config: Any) -> None:
        self.reports.append(report)


def _wire(obj: Any) -> Any:
    """What gather_object/scatter_object do to a plan."""
    return pickle.loads(pickle.dumps(obj))


@attrs.define
class SaveResult:
    finals: list[Any]
    global_plan: list[Any]
    metadata: Any
    coordinator: Any
    gathered_bytes: int


class Sim:
    """N simulated ranks with persistent per-rank cache stores."""

    def __init__(self, writer_dir: str, pm: DcplanPluginManager, cached: bool, **config: Any) -> None:
        self.pm = pm
        self.cached = cached
        self.config = dcplan.Config(plan_cache=cached, **config)  # skips the config-file search per planner
        self.stores: dict[int, CacheStore] = {}
        self.writer = FileSystemWriter(writer_dir)
        self.planners: dict[int, Any] = {}

    def planner(self, rank: int, fresh: bool) -> Any:
        if fresh or rank not in self.planners:
            p = dcplan.SavePlanner(self.config, plugin_manager=self.pm)
            if self.cached:
                p.cache = PlanCache(p.config, store=self.stores.setdefault(rank, CacheStore()))
            self.planners[rank] = p
        return self.planners[rank]

    def save(
        self, state_dicts: list[dict[str, Any]], fresh: bool = True, ranks: list[int] | None = None
    ) -> SaveResult:
        """One ``dcp.save``; ``ranks`` names the simulated processes taking part (default: 0..N-1),
        the first one coordinating."""
        world = len(state_dicts)
        planners = [self.planner(r, fresh) for r in (ranks or range(world))]
        local = []
        for r, (p, sd) in enumerate(zip(planners, state_dicts)):
            p.set_up_planner(sd, storage_meta=None, is_coordinator=r == 0)
            local.append(_wire(p.create_local_plan()))
        gathered = sum(len(pickle.dumps(lp)) for lp in local)
        delta, metadata = planners[0].create_global_plan(local)
        delta = self.writer.prepare_global_plan(delta)
        finals = [p.finish_plan(_wire(d)) for p, d in zip(planners, delta)]
        return SaveResult(finals, list(planners[0].global_plan), metadata, planners[0], gathered)


# ----------------------------------------------------------------- world model

DTYPES = [torch.float32, torch.int64, torch.bfloat16, torch.float16]


@attrs.frozen
class Key:
    name: str  # "g/x" nests as {"g": {"x": ...}}
    kind: str  # tensor | shard | obj
    dtype: torch.dtype
    shape: tuple[int, ...]
    holders: tuple[int, ...]
    value: int = 0  # obj payload / tensor fill


def _shard_bounds(key: Key, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = len(key.holders)
    rows = key.shape[0]
    lo, hi = rows * i // n, rows * (i + 1) // n
    return (lo,) + (0,) * (len(key.shape) - 1), (hi - lo,) + key.shape[1:]


def build_states(world: int, keys: tuple[Key, ...], bad: bool = False) -> list[dict[str, Any]]:
    """Per-rank nested state dicts; ``bad`` adds an out-of-bounds shard on the last rank (invalid plan)."""
    states: list[dict[str, Any]] = [{} for _ in range(world)]
    if bad:
        states[-1]["bad_shard"] = Shard((4,), (2,), (4,), torch.float32)
    for key in keys:
        for i, r in enumerate(key.holders):
            if r >= world:
                continue
            if key.kind == "tensor":
                value: Any = torch.full(key.shape, key.value, dtype=key.dtype)
            elif key.kind == "shard":
                offsets, sizes = _shard_bounds(key, i)
                value = Shard(key.shape, offsets, sizes, key.dtype)
            else:
                value = {"step": key.value, "tag": "x" * (key.value % 5)}
            node = states[r]
            *parents, leaf = key.name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return states


NAMES = ["w", "b", "g/x", "g/y", "opt/m", "opt/v", "step", "h/k/z"]


@st.composite
def keys_st(draw: Any, world: int, name: str) -> Key:
    kind = draw(st.sampled_from(["tensor", "tensor", "shard", "obj"]))
    holders = tuple(sorted(draw(st.sets(st.integers(0, world - 1), min_size=1))))
    if kind == "shard":
        shape = (draw(st.integers(len(holders), 6)), draw(st.integers(1, 3)))
    else:
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    return Key(name, kind, draw(st.sampled_from(DTYPES)), shape, holders, draw(st.integers(0, 9)))


@st.composite
def world_st(draw: Any, world: int) -> tuple[Key, ...]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    # a name cannot be both a leaf and a parent ("g" vs "g/x"): NAMES avoids that
    return tuple(draw(keys_st(world, n)) for n in sorted(names))


MUTATIONS = ["same", "same", "values", "add", "remove", "dtype", "shape", "holders", "world", "invalid", "swap"]


def mutate(draw: Any, world: int, keys: tuple[Key, ...], op: str) -> tuple[int, tuple[Key, ...]]:
    keys = list(keys)
    i = draw(st.integers(0, len(keys) - 1))
    k = keys[i]
    if op == "values":
        keys = [attrs.evolve(x, value=(x.value + 1) % 10) if x.kind == "tensor" else x for x in keys]
    elif op == "add":
        free = [n for n in NAMES if n not in {x.name for x in keys}]
        if free:
            keys.append(draw(keys_st(world, draw(st.sampled_from(free)))))
    elif op == "remove" and len(keys) > 1:
        keys.pop(i)
    elif op == "dtype":
        keys[i] = attrs.evolve(k, dtype=draw(st.sampled_from([d for d in DTYPES if d != k.dtype])))
    elif op == "shape":
        if k.kind == "shard":
            keys[i] = attrs.evolve(k, shape=(k.shape[0] + 1, k.shape[1]))
        else:
            keys[i] = attrs.evolve(k, shape=k.shape + (2,) if len(k.shape) < 3 else k.shape[:1])
    elif op == "holders":
        holders = tuple(sorted(draw(st.sets(st.integers(0, world - 1), min_size=1))))
        if k.kind == "shard":
            holders = holders[: k.shape[0]]
        keys[i] = attrs.evolve(k, holders=holders)
    elif op == "world":
        world = draw(st.integers(1, 4))
        fixed = []
        for x in keys:
            holders = tuple(h for h in x.holders if h < world) or (world - 1,)
            if x.kind == "shard":
                holders = holders[: x.shape[0]]
            fixed.append(attrs.evolve(x, holders=holders))
        keys = fixed
    keys.sort(key=lambda x: x.name)
    return world, tuple(keys)


@st.composite
def scenario_st(draw: Any) -> dict[str, Any]:
    world = draw(st.integers(1, 4))
    models = {"m": draw(world_st(world))}
    if draw(st.booleans()):
        other = draw(world_st(world))
        models["o"] = tuple(attrs.evolve(k, name="o_" + k.name.replace("/", "_")) for k in other)
    steps = []
    worlds = dict.fromkeys(models, world)
    for _ in range(draw(st.integers(2, 6))):
        which = draw(st.sampled_from(sorted(models)))
        op = draw(st.sampled_from(MUTATIONS))
        bad = op == "invalid"
        if op == "swap":
            which = draw(st.sampled_from(sorted(models)))
        elif op not in ("same",):
            worlds[which], models[which] = mutate(draw, worlds[which], models[which], op)
        steps.append((which, worlds[which], models[which], bad, op))
    return {
        "steps": steps,
        "strategy": draw(st.sampled_from(["size_balanced", "lowest_rank", "torch"])),
        "size": draw(st.integers(1, 3)),
        "fresh": draw(st.booleans()),
    }


def _same_structure(a: SaveResult, b: SaveResult) -> None:
    assert repr(a.metadata) == repr(b.metadata)
    assert [repr(p) for p in a.global_plan] == [repr(p) for p in b.global_plan]
    assert [repr(p) for p in a.finals] == [repr(p) for p in b.finals]


def run_scenario(sc: dict[str, Any], tmp: str) -> dict[str, int]:
    plugin = ShardPlugin()
    pm = DcplanPluginManager(extra_plugins=[("cache_test_shards", plugin)])
    cold = Sim(tmp, pm, cached=False, strategy=sc["strategy"])
    warm = Sim(tmp, pm, cached=True, strategy=sc["strategy"], plan_cache_size=sc["size"])
    previous: Any = None
    counts = {"hits": 0, "misses": 0, "errors": 0}
    refs: dict[Any, Any] = {}  # a cold planner keeps no state: one run per distinct state suffices
    for which, world, keys, bad, _op in sc["steps"]:
        states = build_states(world, keys, bad)
        try:
            if (world, keys, bad) not in refs:
                try:
                    refs[world, keys, bad] = cold.save(states)
                except PlanValidationError as exc:
                    refs[world, keys, bad] = exc
            ref = refs[world, keys, bad]
            if isinstance(ref, PlanValidationError):
                raise ref
        except PlanValidationError:
            with pytest.raises(PlanValidationError):
                warm.save(states, fresh=sc["fresh"])
            counts["errors"] += 1
            previous = None
            continue
        got = warm.save(states, fresh=sc["fresh"])
        _same_structure(got, ref)
        outcome = got.coordinator.cache.outcome
        counts["hits" if outcome == "hit" else "misses"] += 1
        if previous == (which, world, keys):
            assert outcome == "hit", "an unchanged structure must be a cache hit"
        previous = (which, world, keys)
    return counts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario_st())
def test_cached_saves_equal_cold_saves(tmp_path_factory: Any, sc: dict[str, Any]) -> None:
    run_scenario(sc, str(tmp_path_factory.getbasetemp()))


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(scenario_st())
def test_cached_saves_equal_cold_saves_10k(tmp_path_factory: Any, sc: dict[str, Any]) -> None:
    run_scenario(sc, str(tmp_path_factory.getbasetemp()))


# ----------------------------------------------------------------- targeted cases


@pytest.fixture
def plugin() -> ShardPlugin:
    return ShardPlugin()


@pytest.fixture
def pm(plugin: ShardPlugin) -> DcplanPluginManager:
    return DcplanPluginManager(extra_plugins=[("cache_test_shards", plugin)])


def _replicated(world: int, sd: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(sd) for _ in range(world)]


def test_dtype_change_same_shape_replans(tmp_path: Any, pm: DcplanPluginManager) -> None:
    sim = Sim(str(tmp_path), pm, cached=True)
    first = sim.save(_replicated(2, {"w": torch.zeros(4)}))
    assert first.metadata.state_dict_metadata["w"].properties.dtype == torch.float32
    second = sim.save(_replicated(2, {"w": torch.arange(4)}))
    assert second.coordinator.cache.outcome == "miss"
    assert second.metadata.state_dict_metadata["w"].properties.dtype == torch.int64
    third = sim.save(_replicated(2, {"w": torch.arange(4) + 1}))
    assert third.coordinator.cache.outcome == "hit"
    assert third.metadata.state_dict_metadata["w"].properties.dtype == torch.int64


def test_hit_skips_dedup_and_validation_and_keeps_report(
    tmp_path: Any, pm: DcplanPluginManager, plugin: ShardPlugin
) -> None:
    sim = Sim(str(tmp_path), pm, cached=True)
    sd = {"a": torch.zeros(8), "b": torch.ones(3, 3), "meta": {"epoch": 1}}
    first = sim.save(_replicated(3, sd))
    calls = (plugin.dedup_calls, plugin.validate_calls)
    assert calls == (1, 1)
    second = sim.save(_replicated(3, sd))
    assert second.coordinator.cache.outcome == "hit"
    assert (plugin.dedup_calls, plugin.validate_calls) == calls
    assert second.coordinator.report is not None
    assert second.coordinator.report == first.coordinator.report
    assert len(plugin.reports) == 2  # the report hook still fires once per save
    assert all(p.cache.sent == "marker" for p in sim.planners.values())
    # markers are small and independent of the state's size
    assert second.gathered_bytes < first.gathered_bytes
    assert max(len(pickle.dumps(p)) for p in [compat.replace_plan(compat.SavePlan([]), planner_data=RankPayload(
        None, sim.planners[0].agreement(), CacheMsg("0" * 32, True, ("abcd.1", 0))))]) < 1500


def test_one_rank_changes_forces_replan_everywhere(tmp_path: Any, pm: DcplanPluginManager) -> None:
    warm = Sim(str(tmp_path), pm, cached=True)
    cold = Sim(str(tmp_path), pm, cached=False)
    base = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    warm.save(_replicated(4, base))
    states = _replicated(4, base)
    states[2] = {**base, "extra": torch.zeros(2)}
    got = warm.save(states)
    assert got.coordinator.cache.outcome == "miss"
    assert [p.cache.sent for _, p in sorted(warm.planners.items())] == ["marker", "marker", "plan", "marker"]
    _same_structure(got, cold.save(states))
    assert "extra" in got.metadata.state_dict_metadata
    again = warm.save(states)
    assert again.coordinator.cache.outcome == "hit"
    _same_structure(again, cold.save(states))


def test_namespaces_keep_model_and_optimizer_apart(tmp_path: Any, pm: DcplanPluginManager) -> None:
    sim = Sim(str(tmp_path), pm, cached=True)
    model = {"layer.weight": torch.zeros(4, 4), "layer.bias": torch.zeros(4)}
    optim = {"state": {"0": {"exp_avg": torch.zeros(4, 4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    outcomes = []
    for _ in range(3):
        outcomes.append(sim.save(_replicated(2, model)).coordinator.cache.outcome)
        outcomes.append(sim.save(_replicated(2, optim)).coordinator.cache.outcome)
    assert outcomes == ["miss", "miss", "hit", "hit", "hit", "hit"]
    # an explicit namespace shared by both makes them evict each other, yet stays correct
    shared = Sim(str(tmp_path), pm, cached=True, cache_namespace="same")
    cold = Sim(str(tmp_path), pm, cached=False)
    for sd in (model, optim, model, optim):
        got = shared.save(_replicated(2, sd))
        assert got.coordinator.cache.outcome == "miss"
        _same_structure(got, cold.save(_replicated(2, sd)))


def test_lru_bound(tmp_path: Any, pm: DcplanPluginManager) -> None:
    sim = Sim(str(tmp_path), pm, cached=True, plan_cache_size=2)
    sds = [{f"k{i}": torch.zeros(2)} for i in range(3)]
    for sd in sds:
        sim.save(_replicated(2, sd))
    assert len(sim.stores[0].coord[2]) == 2
    assert sim.save(_replicated(2, sds[2])).coordinator.cache.outcome == "hit"
    assert sim.save(_replicated(2, sds[0])).coordinator.cache.outcome == "miss"  # evicted


def test_failed_save_does_not_poison(tmp_path: Any, pm: DcplanPluginManager) -> None:
    warm = Sim(str(tmp_path), pm, cached=True)
    cold = Sim(str(tmp_path), pm, cached=False)
    good = _replicated(2, {"w": torch.zeros(4)})
    bad = _replicated(2, {"w": torch.zeros(4)})
    bad[1] = {"w": torch.zeros(4), "s": Shard((4,), (2,), (4,), torch.float32)}
    with pytest.raises(PlanValidationError):
        warm.save(bad)  # first save fails: nothing cached
    got = warm.save(good)
    assert got.coordinator.cache.outcome == "miss"
    _same_structure(got, cold.save(good))
    with pytest.raises(PlanValidationError):
        warm.save(bad)  # a failure after a good save
    got = warm.save(good)
    _same_structure(got, cold.save(good))
    assert warm.save(good).coordinator.cache.outcome == "hit"


def test_failure_after_coordinator_commit_then_revert(tmp_path: Any, pm: DcplanPluginManager) -> None:
    """The coordinator committed a new plan but a rank never finished: that rank must not send stale markers."""
    warm = Sim(str(tmp_path), pm, cached=True)
    cold = Sim(str(tmp_path), pm, cached=False)
    a = _replicated(2, {"w": torch.zeros(4)})
    b = [{"w": torch.zeros(4)}, {"w": torch.zeros(4), "x": torch.zeros(1)}]
    warm.save(a)
    planners = [warm.planner(r, True) for r in range(2)]
    local = []
    for r, p in enumerate(planners):
        p.set_up_planner(b[r], is_coordinator=r == 0)
        local.append(_wire(p.create_local_plan()))
    delta, _ = planners[0].create_global_plan(local)
    planners[0].finish_plan(_wire(warm.writer.prepare_global_plan(delta)[0]))  # rank 1 never finishes
    got = warm.save(a)  # rank 1 reverts to a structure it had cached
    _same_structure(got, cold.save(a))


def test_coordinator_losing_its_cache_fails_cleanly_then_recovers(tmp_path: Any, pm: DcplanPluginManager) -> None:
    warm = Sim(str(tmp_path), pm, cached=True)
    cold = Sim(str(tmp_path), pm, cached=False)
    sd = _replicated(3, {"w": torch.zeros(4)})
    warm.save(sd)
    warm.stores[0].clear()  # e.g. the coordinator process restarted
    with pytest.raises(PlanCacheError, match="retry the save"):
        warm.save(sd)
    got = warm.save(sd)
    _same_structure(got, cold.save(sd))
    assert warm.save(sd).coordinator.cache.outcome == "hit"


def test_world_size_change(tmp_path: Any, pm: DcplanPluginManager) -> None:
    warm = Sim(str(tmp_path), pm, cached=True)
    cold = Sim(str(tmp_path), pm, cached=False)
    for world in (4, 2, 4, 3, 4, 4):
        states = [{"w": torch.zeros(4), f"r{r}": torch.zeros(2)} for r in range(world)]
        got = warm.save(states)
        _same_structure(got, cold.save(states))
        assert len(got.finals) == world
    assert got.coordinator.cache.outcome == "hit"


def test_storage_data_refreshed_on_hit(tmp_path: Any, pm: DcplanPluginManager) -> None:
    sim = Sim(str(tmp_path / "a"), pm, cached=True)
    sd = _replicated(2, {"w": torch.zeros(4), "v": torch.zeros(4)})
    first = sim.save(sd)
    sim.writer = FileSystemWriter(str(tmp_path / "b"))
    second = sim.save(sd)
    assert second.coordinator.cache.outcome == "hit"
    assert [f.storage_data for f in second.finals] == [f.storage_data for f in first.finals]
    assert all(f.storage_data is not None and compat.plan_usable(f) for f in second.finals)
    assert all(f.planner_data is None for f in second.finals)
    # the writer mutates the metadata it receives; the cached copy stays pristine
    second.metadata.storage_data = {"mutated": True}
    assert sim.save(sd).metadata.storage_data is None


def test_bytes_item_size_is_part_of_the_key(tmp_path: Any, pm: DcplanPluginManager) -> None:
    sim = Sim(str(tmp_path), pm, cached=True)
    sim.save(_replicated(2, {"obj": "x", "w": torch.zeros(2)}))
    got = sim.save(_replicated(2, {"obj": "x" * 100, "w": torch.zeros(2)}))
    expected = "miss" if compat.HAS_BYTES_IO_DATA else "hit"  # sizes are recorded from torch 2.8
    assert got.coordinator.cache.outcome == expected


def test_strategy_change_is_a_miss(tmp_path: Any, pm: DcplanPluginManager) -> None:
    store = CacheStore()
    sd = {"w": torch.zeros(4)}
    outcomes = []
    for strategy in ("size_balanced", "lowest_rank", "lowest_rank"):
        p = dcplan.SavePlanner(plugin_manager=pm, plan_cache=True, strategy=strategy)
        p.cache = PlanCache(p.config, store=store)
        p.set_up_planner(sd, is_coordinator=True)
        delta, _ = p.create_global_plan([_wire(p.create_local_plan())])
        p.finish_plan(_wire(delta[0]))
        outcomes.append(p.cache.outcome)
    assert outcomes == ["miss", "miss", "hit"]


def test_cache_off_by_default(tmp_path: Any, pm: DcplanPluginManager) -> None:
    p = dcplan.SavePlanner(plugin_manager=pm)
    assert p.cache is None
    assert dcplan.SavePlanner(plugin_manager=pm, plan_cache=True).cache is not None


def test_fingerprint_covers_every_item_field() -> None:
    base = tensor_item("w", (4, 4), (0, 0), (2, 4))
    variants = [
        tensor_item("v", (4, 4), (0, 0), (2, 4)),
        tensor_item("w", (4, 4), (2, 0), (2, 4)),
        tensor_item("w", (4, 4), (0, 0), (3, 4)),
        tensor_item("w", (8, 4), (0, 0), (2, 4)),
        tensor_item("w", (4, 4), (0, 0), (2, 4), dtype=torch.int64),
        tensor_item("w", (4, 4)),
    ]
    fp = plan_fingerprint(compat.SavePlan([base]))
    fps = {plan_fingerprint(compat.SavePlan([v])) for v in variants}
    assert fp not in fps and len(fps) == len(variants)
    assert plan_fingerprint(compat.SavePlan([base]), "x") != fp
    assert plan_fingerprint(compat.replace_plan(compat.SavePlan([base]), planner_data={"w": ("w",)})) != fp


def test_fingerprint_ignores_pythonhashseed() -> None:
    code = (
        "from dcplan import compat; from dcplan.save.cache import plan_fingerprint;"
        "from dcplan.testing.plans import tensor_item, bytes_item;"
        "p = compat.replace_plan(compat.SavePlan([tensor_item('a', (2,)), tensor_item('b', (4, 1), (2, 0), (2, 1)),"
        " bytes_item('c', 7)]), planner_data={'a': ('a',), 'b': ('b',), 'c': ('c',)});"
        "print(plan_fingerprint(p, ('x', 1)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "7"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here: dict[str, str] = {}
    exec(code.replace("print(plan_fingerprint", "here['fp'] = (plan_fingerprint"), {"here": here})
    assert out.stdout.strip() == here["fp"]


def test_default_namespace(pm: DcplanPluginManager) -> None:
    p = dcplan.SavePlanner(plugin_manager=pm, plan_cache=True)
    p.set_up_planner({"b": 1, "a": 2}, is_coordinator=True)
    ns1 = default_namespace(p)
    p.set_up_planner({"a": 3, "b": torch.zeros(1)}, is_coordinator=True)
    assert default_namespace(p) == ns1
    p.set_up_planner({"state": {}, "param_groups": []}, is_coordinator=True)
    assert default_namespace(p) != ns1
    q = dcplan.SavePlanner(plugin_manager=pm, plan_cache=True, cache_namespace="model")
    q.set_up_planner({"a": 1}, is_coordinator=True)
    assert default_namespace(q) == "model"


def test_messages_pickle() -> None:
    for obj in (CacheMsg("f", True, ("g", 1)), CacheAck("g", 2, 1, ("g",), ("g", 1))):
        assert _wire(obj) == obj


@pytest.mark.parametrize("namespace", [None, "per-group"])
def test_processes_in_several_groups(tmp_path: Any, pm: DcplanPluginManager, namespace: str | None) -> None:
    """Group A = processes [0, 1] (0 coordinates), group B = [2, 1] (2 coordinates), and process 1 also
    saves alone (it coordinates itself). With a namespace per group every repeated round hits; with
    the default namespace process 1 cannot tell A from B at first: at most one save fails cleanly
    (PlanCacheError, nothing written), its retry works, and later rounds hit."""
    warm = Sim(str(tmp_path), pm, cached=True)
    cold = Sim(str(tmp_path), pm, cached=False)
    sd = [{"w": torch.zeros(4), "x": torch.zeros(2)}, {"w": torch.zeros(4)}]
    outcomes = []
    errors = 0
    for _ in range(4):
        for ranks in ([0, 1], [2, 1], [1]):
            if namespace is not None:
                warm.config = attrs.evolve(warm.config, cache_namespace=f"group{ranks[0]}")
            states = sd[: len(ranks)]
            try:
                got = warm.save(states, ranks=ranks)
            except PlanCacheError:
                errors += 1
                got = warm.save(states, ranks=ranks)
            _same_structure(got, cold.save(states))
            outcomes.append(got.coordinator.cache.outcome)
    if namespace is not None:
        assert errors == 0
        assert outcomes[3:] == ["hit"] * 9
    else:
        assert errors <= 1
        assert outcomes[-6:] == ["hit"] * 6
