"""Rank functions for tests/test_cache_dist.py (run on a GlooPool: ``fn(rank, world_size, ...)``)."""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import dcplan
from dcplan import compat
from dcplan.save.cache import clear_plan_caches

TORCH_HAS_PLAN_CACHING = "enable_plan_caching" in inspect.signature(compat.DefaultSavePlanner.__init__).parameters


def _save(sd: dict[str, Any], path: str, planner: Any, group: Any = None, writer: Any = None) -> None:
    dcp.save(sd, storage_writer=writer or FileSystemWriter(path), planner=planner, process_group=group)


def _dtypes(path: str) -> dict[str, str]:
    md = FileSystemReader(path).read_metadata()
    return {k: str(v.properties.dtype) for k, v in sorted(md.state_dict_metadata.items()) if hasattr(v, "properties")}


def _keys(path: str) -> list[str]:
    return sorted(FileSystemReader(path).read_metadata().state_dict_metadata)


def _load(template: dict[str, Any], path: str, group: Any = None) -> dict[str, Any]:
    dcp.load(template, storage_reader=FileSystemReader(path), process_group=group)
    return template


def _cached(**kw: Any) -> dcplan.SavePlanner:
    return dcplan.SavePlanner(plan_cache=True, **kw)


def _outcome(planner: dcplan.SavePlanner) -> str | None:
    return planner.cache.outcome if dist.get_rank() == 0 else planner.cache.sent


def dtype_change(rank: int, world: int, root: str) -> dict[str, Any]:
    """Same shape, new dtype, new path: dcplan's metadata follows; torch's cache (2.7+) does not."""
    clear_plan_caches()
    out: dict[str, Any] = {}
    _save({"w": torch.zeros(4)}, os.path.join(root, "dcplan_a"), _cached())
    p = _cached()
    _save({"w": torch.arange(4)}, os.path.join(root, "dcplan_b"), p)
    out["dcplan_outcome"] = _outcome(p)
    out["dcplan_dtypes"] = _dtypes(os.path.join(root, "dcplan_b"))
    out["dcplan_values"] = _load({"w": torch.zeros(4, dtype=torch.int64)}, os.path.join(root, "dcplan_b"))["w"].tolist()
    if TORCH_HAS_PLAN_CACHING:
        # torch keys its class-level cache by class name: a fresh name isolates this test
        name = "TorchCaching_" + hashlib.sha1(root.encode()).hexdigest()[:10]
        cls = type(name, (compat.DefaultSavePlanner,), {})
        _save({"w": torch.zeros(4)}, os.path.join(root, "torch_a"), cls(enable_plan_caching=True))
        _save({"w": torch.arange(4)}, os.path.join(root, "torch_b"), cls(enable_plan_caching=True))
        out["torch_dtypes"] = _dtypes(os.path.join(root, "torch_b"))
    return out


def one_rank_changes(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 1 adds a key in the second save; the third save repeats the second."""
    clear_plan_caches()
    base = {"w": torch.full((4, 4), float(rank == 0)), "b": torch.arange(4.0)}
    outcomes = []
    for i in range(3):
        sd = dict(base)
        if i > 0 and rank == 1:
            sd["extra"] = torch.full((3,), 7.0)
        sd["w"] = torch.full((4, 4), float(i))
        p = _cached()
        _save(sd, os.path.join(root, f"s{i}"), p)
        outcomes.append(_outcome(p))
    keys = [_keys(os.path.join(root, f"s{i}")) for i in range(3)]
    loaded = _load({"w": torch.zeros(4, 4), "b": torch.zeros(4), "extra": torch.zeros(3)}, os.path.join(root, "s2"))
    return {
        "outcomes": outcomes,
        "keys": keys,
        "w": loaded["w"].sum().item(),
        "extra": loaded["extra"].tolist(),
        "stats": dict(dcplan.save.cache.get_store().stats),
    }


def failed_then_ok(rank: int, world: int, root: str) -> dict[str, Any]:
    """An invalid first save (rank 0 holds an object where others hold a tensor), then valid saves."""
    clear_plan_caches()
    out: dict[str, Any] = {}
    bad = {"w": 1} if rank == 0 else {"w": torch.zeros(4)}
    try:
        _save(bad, os.path.join(root, "bad"), _cached())
        out["bad"] = "saved"
    except BaseException as exc:  # noqa: BLE001 - CheckpointException (a BaseException) wrapping the coordinator's PlanValidationError
        out["bad"] = type(exc).__name__ + ": " + str(exc)
    out["bad_written"] = os.path.exists(os.path.join(root, "bad", ".metadata"))
    outcomes = []
    for i in range(2):
        p = _cached()
        _save({"w": torch.full((4,), float(i + 1))}, os.path.join(root, f"ok{i}"), p)
        outcomes.append(_outcome(p))
    out["outcomes"] = outcomes
    out["dtypes"] = _dtypes(os.path.join(root, "ok1"))
    out["w"] = _load({"w": torch.zeros(4)}, os.path.join(root, "ok1"))["w"].tolist()
    return out


class FailingWriter(FileSystemWriter):
    """Fails ``write_data`` on one rank (a disk error after planning succeeded)."""

    fail_rank = 1

    def write_data(self, plan: Any, planner: Any) -> Any:
        if dist.get_rank() == self.fail_rank:
            raise OSError("simulated disk failure")
        return super().write_data(plan, planner)


def write_failure(rank: int, world: int, root: str) -> dict[str, Any]:
    """A save whose write fails keeps its (correct) plan cached; the next save is right."""
    clear_plan_caches()
    out: dict[str, Any] = {}
    try:
        _save({"w": torch.zeros(6), "v": torch.zeros(2)}, "", _cached(),
              writer=FailingWriter(os.path.join(root, "broken")))
        out["first"] = "saved"
    except BaseException as exc:  # noqa: BLE001 - CheckpointException is a BaseException
        out["first"] = type(exc).__name__
    p = _cached()
    _save({"w": torch.arange(6.0), "v": torch.ones(2)}, os.path.join(root, "after"), p)
    out["outcome"] = _outcome(p)
    loaded = _load({"w": torch.zeros(6), "v": torch.zeros(2)}, os.path.join(root, "after"))
    out["w"] = loaded["w"].tolist()
    out["v"] = loaded["v"].tolist()
    return out


def namespaces(rank: int, world: int, root: str) -> dict[str, Any]:
    """Model and optimizer saves alternate with one planner class: each keeps its entry."""
    clear_plan_caches()
    model = {"layer.weight": torch.ones(4, 4), "layer.bias": torch.ones(4)}
    optim = {"state": {"0": {"exp_avg": torch.full((4, 4), 2.0), "step": torch.tensor(3.0)}},
             "param_groups": [{"lr": 0.1, "params": [0]}]}
    outcomes = []
    for i in range(2):
        for name, sd in (("model", model), ("optim", optim)):
            p = _cached()
            _save(sd, os.path.join(root, f"{name}{i}"), p)
            outcomes.append(_outcome(p))
    m = _load({"layer.weight": torch.zeros(4, 4), "layer.bias": torch.zeros(4)}, os.path.join(root, "model1"))
    o = _load({"state": {"0": {"exp_avg": torch.zeros(4, 4), "step": torch.tensor(0.0)}},
               "param_groups": [{"lr": 0.0, "params": [0]}]}, os.path.join(root, "optim1"))
    return {
        "outcomes": outcomes,
        "model": m["layer.weight"].sum().item(),
        "optim": o["state"]["0"]["exp_avg"].sum().item(),
        "lr": o["param_groups"][0]["lr"],
    }


def world_change(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save with every rank, then with a 2-rank subgroup, then with every rank again."""
    clear_plan_caches()
    sub = dist.new_group([0, 1])
    outcomes: list[Any] = []
    keys = []
    for i, group in enumerate((None, sub, None, None)):
        members = world if group is None else 2
        if rank >= members:
            outcomes.append(None)
            keys.append(None)
            dist.barrier()
            continue
        sd = {"w": torch.full((4,), float(i)), f"r{rank}": torch.full((2,), float(rank))}
        p = _cached()
        _save(sd, os.path.join(root, f"s{i}"), p, group=group)
        outcomes.append(_outcome(p))
        keys.append(_keys(os.path.join(root, f"s{i}")))
        dist.barrier()
    dist.destroy_process_group(sub)
    return {"outcomes": outcomes, "keys": keys}
