"""Functions run on every rank of a GlooPool by test_wire_dist.py (must be importable)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _bits import flat
from torch import nn

import dcplan
from dcplan import compat
from dcplan.testing.wirecount import counting


def _state(kind: str, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    sd: dict[str, Any] = {"model": model.state_dict(), "optim": opt.state_dict(), "meta": {"epoch": seed, "tag": "x"}}
    if kind == "sharded":
        from torch.distributed.device_mesh import init_device_mesh

        _, Shard = compat.dtensor_placements()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        full = torch.arange(60.0 + seed).reshape(-1)[:60].reshape(12, 5) * (seed + 1)
        sd["sharded"] = {
            "w": compat.distribute_tensor(full, mesh, [Shard(0)]),
            "v": compat.distribute_tensor(full.t().contiguous().to(torch.bfloat16), mesh, [Shard(1)]),
        }
        sd["local"] = torch.full((3,), float(dist.get_rank() + seed))  # a rank-local tensor (last writer wins)
    return sd


def save_load(rank: int, world: int, path: str, kind: str, planner: str, group: str = "default") -> dict[str, Any]:
    """Save with ``planner`` ("dcplan" or "torch"), count the planning bytes, reload with both loaders."""
    pg = None
    planner_pg = None
    if group == "other":  # same members, another group object: the exchange must step aside
        planner_pg = dist.new_group(list(range(world)))
    elif group == "explicit":
        pg = planner_pg = dist.new_group(list(range(world)))
    state = _state(kind, 0)
    p = compat.torch_default_save_planner() if planner == "torch" else dcplan.SavePlanner(process_group=planner_pg)
    with counting() as count:
        dcp.save(state, checkpoint_id=path, planner=p, process_group=pg)
    out: dict[str, Any] = {"count": count.to_dict()}
    state.pop("local", None)
    for loader in ("dcplan", "torch"):
        fresh = _state(kind, 1)
        fresh.pop("local", None)
        lp = dcplan.LoadPlanner() if loader == "dcplan" else compat.torch_default_load_planner()
        dcp.load(fresh, checkpoint_id=path, planner=lp, process_group=pg)
        out[f"equal_{loader}"] = flat(state) == flat(fresh)
    if planner == "dcplan":
        out["written"] = sorted((i.index.fqn, tuple(i.index.offset or ())) for i in p.plan.items)
    return out


def store_save(rank: int, world: int, path: str, store_dir: str, extra: bool = False) -> dict[str, Any]:
    """A save with ``plan_cache_dir``; returns the store's outcome, the bytes and both reloads."""
    import logging

    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Keep()
    logging.getLogger("dcplan").addHandler(handler)
    logging.getLogger("dcplan").setLevel(logging.INFO)
    try:
        state = _state("sharded", 0)
        state.pop("local")
        if extra:
            state["model"]["added"] = torch.ones(2)
        p = dcplan.SavePlanner(plan_cache_dir=store_dir, report=False)
        with counting() as count:
            dcp.save(state, checkpoint_id=path, planner=p)
    finally:
        logging.getLogger("dcplan").removeHandler(handler)
    out: dict[str, Any] = {"count": count.to_dict(), "outcome": p.plan_store.outcome if p.plan_store else None}
    out["log"] = [m for m in records if "plan store" in m]
    for loader in ("dcplan", "torch"):
        fresh = _state("sharded", 1)
        fresh.pop("local")
        if extra:
            fresh["model"]["added"] = torch.zeros(2)
        lp = dcplan.LoadPlanner() if loader == "dcplan" else compat.torch_default_load_planner()
        dcp.load(fresh, checkpoint_id=path, planner=lp)
        out[f"equal_{loader}"] = flat(state) == flat(fresh)
    return out


class _BrokenOnRank1(dcplan.SavePlanner):
    def _create_local_plan(self) -> Any:
        if dist.get_rank() == 1:
            raise RuntimeError("broken local plan on rank 1")
        return super()._create_local_plan()


def local_failure(rank: int, world: int, path: str) -> str:
    """Rank 1 fails in its local step: every rank must get the error (no rank waits in the exchange)."""
    try:
        dcp.save(_state("ddp", 0), checkpoint_id=path, planner=_BrokenOnRank1())
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        return f"{type(exc).__name__}: {exc}"
    return "saved"
