"""Functions run on every rank of a GlooPool by test_integration.py (must be importable)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _bits import flat
from torch import nn

import dcplan
from dcplan import compat


def _ddp_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "meta": {"epoch": seed, "tag": "x", "lst": [1, 2.5]}}


def ddp_roundtrip(rank: int, world: int, path: str, strategy: str, loader: str) -> dict[str, Any]:
    state = _ddp_state(0)
    planner = dcplan.SavePlanner(strategy=strategy)
    dcp.save(state, checkpoint_id=path, planner=planner)
    fresh = _ddp_state(1)
    lp = dcplan.LoadPlanner() if loader == "dcplan" else compat.torch_default_load_planner()
    dcp.load(fresh, checkpoint_id=path, planner=lp)
    written = sorted(i.index.fqn for i in planner.plan.items)
    report = planner.report.to_dict() if rank == 0 else None
    return {"equal": flat(state) == flat(fresh), "written": written, "report": report}


def torch_writes_dcplan_reads(rank: int, world: int, path: str) -> bool:
    state = _ddp_state(0)
    dcp.save(state, checkpoint_id=path, planner=compat.torch_default_save_planner())
    fresh = _ddp_state(1)
    dcp.load(fresh, checkpoint_id=path, planner=dcplan.LoadPlanner())
    return flat(state) == flat(fresh)


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4/2.5
    return fully_shard


def fsdp2_roundtrip(rank: int, world: int, path: str, loader: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    fully_shard = _fully_shard()

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 6))
        for layer in m:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    m = build(0)
    sd = {"model": m.state_dict()}
    planner = dcplan.SavePlanner()
    dcp.save(sd, checkpoint_id=path, planner=planner)
    m2 = build(5)
    sd2 = {"model": m2.state_dict()}
    lp = dcplan.LoadPlanner() if loader == "dcplan" else compat.torch_default_load_planner()
    dcp.load(sd2, checkpoint_id=path, planner=lp)
    types = sorted({type(v).__name__ for v in m.state_dict().values()})
    return {"equal": flat(sd) == flat(sd2), "types": types, "items": len(planner.plan.items)}


def hsdp_roundtrip(rank: int, world: int, path: str, strategy: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    Replicate, Shard = compat.dtensor_placements()
    mesh = init_device_mesh("cpu", (2, world // 2))
    torch.manual_seed(0)
    full = torch.randn(12, 10)
    sd = {"w": compat.distribute_tensor(full, mesh, [Replicate(), Shard(0)]),
          "v": compat.distribute_tensor(torch.arange(40.0).reshape(4, 10), mesh, [Replicate(), Shard(1)])}
    planner = dcplan.SavePlanner(strategy=strategy)
    dcp.save(sd, checkpoint_id=path, planner=planner)
    sd2 = {"w": compat.distribute_tensor(torch.zeros(12, 10), mesh, [Shard(0), Replicate()]),
           "v": compat.distribute_tensor(torch.zeros(4, 10), mesh, [Replicate(), Replicate()])}
    dcp.load(sd2, checkpoint_id=path, planner=dcplan.LoadPlanner())
    return {"equal": flat(sd) == flat(sd2), "chunks": [(i.index.fqn, tuple(i.index.offset)) for i in planner.plan.items]}


def submesh_roundtrip(rank: int, world: int, path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import DeviceMesh

    Replicate, Shard = compat.dtensor_placements()
    sub = DeviceMesh("cpu", [0, 1])
    full = torch.arange(24.0).reshape(6, 4)
    sd = {"sub": compat.distribute_tensor(full, sub, [Shard(0)]), "plain": torch.ones(3) * 7}
    planner = dcplan.SavePlanner()
    dcp.save(sd, checkpoint_id=path, planner=planner)
    sd2 = {"sub": compat.distribute_tensor(torch.zeros(6, 4), sub, [Shard(0)]), "plain": torch.zeros(3)}
    dcp.load(sd2, checkpoint_id=path, planner=dcplan.LoadPlanner())
    in_mesh = sub.get_coordinate() is not None
    ok = torch.equal(sd2["plain"], sd["plain"])
    if in_mesh:
        ok = ok and torch.equal(sd2["sub"].to_local(), sd["sub"].to_local())
    # read back on one process, no mesh: the whole tensor must be there
    return {"ok": ok, "in_mesh": in_mesh, "local_items": [i.index.fqn for i in planner.plan.items]}


def sharded_tensor_roundtrip(rank: int, world: int, path: str) -> bool:
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
    st = sharded_tensor.zeros(spec, 8, 3)
    for shard in st.local_shards():
        shard.tensor.copy_(torch.arange(shard.tensor.numel(), dtype=torch.float32).reshape(shard.tensor.shape) + rank * 100)
    sd = {"nested": {"st": st}}
    dcp.save(sd, checkpoint_id=path, planner=dcplan.SavePlanner())
    st2 = sharded_tensor.zeros(spec, 8, 3)
    sd2 = {"nested": {"st": st2}}
    dcp.load(sd2, checkpoint_id=path, planner=dcplan.LoadPlanner())
    return all(torch.equal(a.tensor, b.tensor) for a, b in zip(st.local_shards(), st2.local_shards()))


def expect_failure(rank: int, world: int, path: str, case: str) -> str:
    """Run a save/load that must fail; return the error text (or 'no error')."""
    try:
        if case == "missing_keys":
            dcp.save({"a": torch.ones(2)}, checkpoint_id=path, planner=dcplan.SavePlanner())
            target = {"a": torch.zeros(2), "model": {"extra1": torch.zeros(1)}, "extra2": torch.zeros(1)}
            dcp.load(target, checkpoint_id=path, planner=dcplan.LoadPlanner())
        elif case == "shape_mismatch":
            dcp.save({"a": torch.ones(2, 3)}, checkpoint_id=path, planner=dcplan.SavePlanner())
            dcp.load({"a": torch.zeros(3, 2)}, checkpoint_id=path, planner=dcplan.LoadPlanner())
        elif case == "strategy_mismatch":
            strategy = "lowest_rank" if rank == world - 1 else "size_balanced"
            dcp.save({"a": torch.ones(2)}, checkpoint_id=path, planner=dcplan.SavePlanner(strategy=strategy))
        elif case == "plugin_mismatch":
            pm = dcplan.manager.DcplanPluginManager(
                env={"DCPLAN_DISABLE_PLUGINS": "dcplan-lowest-rank"} if rank == 1 else {}
            )
            dcp.save({"a": torch.ones(2)}, checkpoint_id=path, planner=dcplan.SavePlanner(plugin_manager=pm))
        elif case == "bad_strategy":
            pm = dcplan.manager.DcplanPluginManager(env={})

            class Twice:
                @dcplan.hookimpl
                def dcplan_register_strategies(self):
                    return [dcplan.Strategy("keep_all", lambda plans: list(plans))]

            pm.register(Twice(), "twice")
            dcp.save({"a": torch.ones(2), "b": torch.ones(3)}, checkpoint_id=path,
                     planner=dcplan.SavePlanner(strategy="keep_all", plugin_manager=pm))
        else:
            raise AssertionError(case)
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        return f"{type(exc).__name__}: {exc}"
    finally:
        dist.barrier()
    return "no error"


def async_roundtrip(rank: int, world: int, path: str) -> bool:
    state = _ddp_state(0)
    fut = dcp.async_save(state, checkpoint_id=path, planner=dcplan.SavePlanner())
    fut.result()
    fresh = _ddp_state(1)
    dcp.load(fresh, checkpoint_id=path, planner=dcplan.LoadPlanner())
    return flat(state) == flat(fresh)


def files_in(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
