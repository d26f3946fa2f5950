"""Rank functions for test_split.py (run on a GlooPool; must be importable)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcplan
from dcplan import compat

SPLIT_OPTIONS = {"min_slice_bytes": 16, "max_slices": 8}


def full_state() -> dict[str, torch.Tensor]:
    """The same values on every process (replicated tensors of several shapes and dtypes)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "big": torch.randn(64, 33, generator=g),
        "cube": torch.randn(16, 4, 5, generator=g).to(torch.bfloat16),
        "ints": torch.randint(0, 1 << 40, (1000,), generator=g, dtype=torch.int64),
        "row": torch.randn(1, 4000, generator=g),  # the largest: split along dim 1
        "scalar": torch.tensor(3.25),
        "tiny": torch.arange(3, dtype=torch.uint8),
        "hsdp": torch.randn(40, 6, generator=g),  # a DTensor on 4 ranks: Shard(0) x Replicate
        "wide": torch.randn(3, 5, 200, generator=g),  # 3 rows for 4 ranks: cut inside rows (sub-row)
    }


def zero_state() -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in full_state().items()}


def _bits(t: torch.Tensor) -> bytes:
    if isinstance(t, compat.DTensor):
        t = t.full_tensor()
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return set(a) == set(b) and all(_bits(a[k]) == _bits(b[k]) for k in a)


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))


def _dist_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    from dcplan.compat import distribute_tensor, dtensor_placements

    Replicate, Shard = dtensor_placements()  # torch.distributed.tensor from 2.5, ._tensor on 2.4
    out: dict[str, Any] = dict(state)
    out["hsdp"] = distribute_tensor(state["hsdp"], _mesh(), [Replicate(), Shard(0)])
    return out


def save_split(rank: int, world: int, path: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save with the split strategy; return what this rank wrote, the report and a 4-rank reload check."""
    state = _dist_state(full_state())
    planner = dcplan.SavePlanner(strategy="split", strategy_options=options or SPLIT_OPTIONS)
    dcp.save(state, checkpoint_id=path, planner=planner)
    written = [
        (i.index.fqn, i.type.name, tuple(i.tensor_data.chunk.offsets), tuple(i.tensor_data.chunk.sizes))
        for i in planner.plan.items
        if i.tensor_data is not None
    ]
    loads = {}
    for loader in ("dcplan", "torch"):
        fresh = _dist_state(zero_state())
        lp = dcplan.LoadPlanner() if loader == "dcplan" else compat.torch_default_load_planner()
        dcp.load(fresh, checkpoint_id=path, planner=lp)
        loads[loader] = same(fresh, state)
    return {"written": written, "report": planner.report.to_dict() if rank == 0 else None, "loads": loads}


def load_on_two(rank: int, world: int, path: str) -> dict[str, bool] | None:
    """Ranks 0 and 1 load the checkpoint as a 2-rank job (a sub-group), with both loaders."""
    group = dist.new_group([0, 1])
    if rank > 1:
        return None
    out = {}
    for loader in ("dcplan", "torch"):
        fresh = zero_state()
        lp = dcplan.LoadPlanner() if loader == "dcplan" else compat.torch_default_load_planner()
        dcp.load(fresh, checkpoint_id=path, planner=lp, process_group=group)
        out[loader] = same(fresh, full_state())
    return out


def save_bad_options(rank: int, world: int, path: str) -> None:
    dcp.save(full_state(), checkpoint_id=path, planner=dcplan.SavePlanner(strategy="split",
                                                                          strategy_options={"min_slice_bytes": 0}))


def load_resharded(rank: int, world: int, path: str) -> dict[str, bool]:
    """Load "wide" (saved replicated, cut inside rows) as a DTensor sharded on its last dimension."""
    from torch.distributed.device_mesh import init_device_mesh

    from dcplan.compat import distribute_tensor, dtensor_placements

    _, Shard = dtensor_placements()
    mesh = init_device_mesh("cpu", (world,))
    want = full_state()["wide"]
    out = {}
    for loader in ("dcplan", "torch"):
        fresh = {"wide": distribute_tensor(torch.zeros_like(want), mesh, [Shard(2)])}
        lp = dcplan.LoadPlanner() if loader == "dcplan" else compat.torch_default_load_planner()
        dcp.load(fresh, checkpoint_id=path, planner=lp)
        out[loader] = _bits(fresh["wide"]) == _bits(want)
    return out
