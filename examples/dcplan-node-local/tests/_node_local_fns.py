"""Functions run on every rank of a GlooPool (module-level so spawned ranks can import them)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import dcplan


def _state_dict(rank: int, fill: bool) -> dict[str, Any]:
    """Replica groups {0,1,2,3} (the model), {2,3} (node 1 only) and {1,2} (across nodes)."""

    def t(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        if not fill:
            return torch.zeros(shape)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g)

    sd: dict[str, Any] = {"model": {f"layer{i}": t((16, 8), i) for i in range(4)}, "step": 7 if fill else 0}
    if rank in (2, 3):
        sd["node1"] = {"w": t((32,), 100), "b": t((4,), 101)}
    if rank in (1, 2):
        sd["pair"] = t((8, 8), 200)
    return sd


def save_and_load(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Save with node_local picked by config (env), load back, compare; return who wrote what."""
    saved = dict(os.environ)
    os.environ["DCPLAN_STRATEGY"] = "node_local"
    os.environ["DCPLAN_STRATEGY_OPTIONS"] = "ranks_per_node=2"
    try:
        planner = dcplan.SavePlanner()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert planner.strategy.name == "node_local"
    dcp.save(_state_dict(rank, True), checkpoint_id=path, planner=planner)

    target = _state_dict(rank, False)
    dcp.load(target, checkpoint_id=path, planner=dcplan.LoadPlanner())
    expected = _state_dict(rank, True)
    flat_t, _ = dcplan.compat.flatten_state_dict(target)
    flat_e, _ = dcplan.compat.flatten_state_dict(expected)
    for key, value in flat_e.items():
        got = flat_t[key]
        assert (torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value), key

    out: dict[str, Any] = {"strategy": planner.strategy.name}
    if rank == 0:
        out["writers"] = {
            i.index.fqn: r for r, plan in enumerate(planner.global_plan) for i in plan.items
        }
        out["ratio"] = planner.report.ratio
    return out
