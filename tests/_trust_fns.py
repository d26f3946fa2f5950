"""Rank functions for tests/test_trust_dist.py (run in a GlooPool)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcplan
from dcplan import compat


def state(rank: int, world: int, dtype_rank: int | None = None) -> dict[str, Any]:
    """A replicated tensor and object, a tensor sharded over every rank (DTensor), and one tensor per rank."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    _, Shard = compat.dtensor_placements()
    full = torch.arange(6.0 * world * 4).reshape(6 * world, 4)
    w_dtype = torch.bfloat16 if rank == dtype_rank else torch.float32
    return {
        "w": torch.ones(8, 4, dtype=w_dtype),
        "sharded": compat.distribute_tensor(full, mesh, [Shard(0)]),
        f"own{rank}": torch.full((4,), float(rank)),
        "step": 9,
    }


def _files(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _attempt(fn: Any) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        fn()
        out = "no error"
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        out = f"{type(exc).__name__}: {exc}"
    return out, time.monotonic() - t0


def adversarial_save(rank: int, world: int, path: str, strategy: str) -> dict[str, Any]:
    sd = state(rank, world)
    err, secs = _attempt(lambda: dcp.save(sd, checkpoint_id=path, planner=dcplan.SavePlanner(strategy=strategy)))
    dist.barrier()
    return {"error": err, "seconds": secs, "files": _files(path)}


def disagreeing_dtype_save(rank: int, world: int, path: str) -> dict[str, Any]:
    sd = state(rank, world, dtype_rank=world - 1)
    err, secs = _attempt(lambda: dcp.save(sd, checkpoint_id=path, planner=dcplan.SavePlanner(strategy="lowest_rank")))
    dist.barrier()
    return {"error": err, "seconds": secs, "files": _files(path)}


def bad_config_on_one_rank(rank: int, world: int, path: str, side: str) -> dict[str, Any]:
    """A junk DCPLAN_VALIDATE in rank 1's environment only; the planner is built outside dcp.save/load."""
    if side == "load":
        dcp.save({"w": torch.ones(4), "step": 9}, checkpoint_id=path, planner=dcplan.SavePlanner())
        dist.barrier()
    if rank == 1:
        os.environ["DCPLAN_VALIDATE"] = "junk"
    try:
        if side == "save":
            planner: Any = dcplan.SavePlanner()
            err, secs = _attempt(lambda: dcp.save({"w": torch.ones(4)}, checkpoint_id=path, planner=planner))
        else:
            target = {"w": torch.zeros(4), "step": 0}
            planner = dcplan.LoadPlanner()
            err, secs = _attempt(lambda: dcp.load(target, checkpoint_id=path, planner=planner))
    finally:
        os.environ.pop("DCPLAN_VALIDATE", None)
    dist.barrier()
    return {"error": err, "seconds": secs, "files": _files(path)}


def careless_strategy_save_load(rank: int, world: int, path: str, strategy: str) -> dict[str, Any]:
    """A strategy that breaks the contract in ways the core absorbs (mutating its input, dropping
    planner_data): the save succeeds and a nested state reloads bit-exact, also from the checkpoint alone."""
    sd = state(rank, world)
    sd = {"model": {"w": sd["w"], "sharded": sd["sharded"]}, f"own{rank}": sd[f"own{rank}"], "step": sd["step"]}
    err, secs = _attempt(lambda: dcp.save(sd, checkpoint_id=path, planner=dcplan.SavePlanner(strategy=strategy)))
    dist.barrier()
    out: dict[str, Any] = {"error": err, "seconds": secs, "files": _files(path)}
    if err != "no error":
        return out
    from torch.distributed.checkpoint import FileSystemReader

    target = {"model": {"w": torch.zeros(8, 4), "sharded": torch.zeros_like(sd["model"]["sharded"])},
              f"own{rank}": torch.zeros(4), "step": 0}
    dcp.load(target, storage_reader=dcplan.FileSystemReader(path), planner=dcplan.LoadPlanner())
    out["equal"] = (
        torch.equal(target["model"]["w"], sd["model"]["w"])
        and torch.equal(target["model"]["sharded"].to_local(), sd["model"]["sharded"].to_local())
        and torch.equal(target[f"own{rank}"], sd[f"own{rank}"])
        and target["step"] == 9
    )
    md = FileSystemReader(path).read_metadata()
    out["mapping"] = sorted(map(str, (md.planner_data or {}).get("model.w", ())))
    return out
