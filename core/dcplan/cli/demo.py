"""``dcplan demo``: real gloo processes save, reload and verify a model.

The model's state has replicated parts (a DDP-style MLP and its Adam state),
DTensor-sharded parts (1-D ``Shard(0)``/``Shard(1)``, and on 4 ranks a 2-D
HSDP-style mesh whose shards are replicated across the first dimension) and
non-tensor objects. Each strategy, and torch's ``DefaultSavePlanner``, saves the
same state; the demo prints who wrote what and reloads every checkpoint into a
freshly initialised model, checking bit-exact equality.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

__all__ = ["run_demo", "build_state", "demo_rank"]


def _mesh_and_placements(world_size: int) -> tuple[Any, Any, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    from dcplan.compat import dtensor_placements

    Replicate, Shard = dtensor_placements()
    mesh1d = init_device_mesh("cpu", (world_size,))
    mesh2d = None
    if world_size % 2 == 0 and world_size >= 4:
        mesh2d = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    return mesh1d, mesh2d, (Replicate, Shard)


def build_state(world_size: int, seed: int, data_seed: int = 1234) -> dict[str, Any]:
    """The demo's state dict (identical on every rank for the replicated parts)."""
    import torch
    from torch import nn

    from dcplan.compat import distribute_tensor

    mesh1d, mesh2d, (Replicate, Shard) = _mesh_and_placements(world_size)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(512, 64), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.LayerNorm(64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(data_seed)
    tokens = torch.randint(0, 512, (8, 16), generator=g)
    model(tokens).float().pow(2).mean().backward()
    opt.step()

    torch.manual_seed(seed + 1)
    sharded: dict[str, Any] = {
        "experts": distribute_tensor(torch.randn(256, 96), mesh1d, [Shard(0)]),
        "proj": distribute_tensor(torch.randn(96, 192), mesh1d, [Shard(1)]),
        "bias": distribute_tensor(torch.randn(96), mesh1d, [Replicate()]),
    }
    if mesh2d is not None:
        sharded["hsdp"] = distribute_tensor(torch.randn(128, 64), mesh2d, [Replicate(), Shard(0)])
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sharded": sharded,
        "extra": {"epoch": 3, "note": "dcplan demo", "losses": [0.5, 0.25]},
    }


def _flat(sd: dict[str, Any]) -> dict[str, Any]:
    from dcplan.compat import DTensor, flatten_state_dict

    flat, _ = flatten_state_dict(sd)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in flat.items()}


def _bytes(t: Any) -> Any:
    import torch

    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(_bytes(a), _bytes(b))
        )
    return bool(a == b)


class _RecordingTorchPlanner:
    """torch's DefaultSavePlanner, recording its local and global plans for the report."""

    @staticmethod
    def make() -> Any:
        from dcplan.compat import torch_default_save_planner

        planner = torch_default_save_planner()
        orig = planner.create_global_plan

        def create_global_plan(all_plans: list[Any]) -> Any:
            t0 = time.perf_counter()
            planner.recorded_local = list(all_plans)
            out = orig(all_plans)
            planner.recorded_global = out[0]
            planner.recorded_time = time.perf_counter() - t0
            return out

        planner.create_global_plan = create_global_plan
        return planner


def demo_rank(
    rank: int, world_size: int, workdir: str, strategies: list[str], load_strategies: list[str] | None = None
) -> dict[str, Any]:
    """Run on every rank: save with each strategy and torch's default, reload, verify.

    With ``load_strategies``, the first strategy's checkpoint is also loaded with each
    load strategy, counting the bytes each rank reads below the reader (``results["_loads"]``).
    """
    import torch
    import torch.distributed.checkpoint as dcp

    import dcplan
    from dcplan.save.report import build_report

    logging.getLogger("dcplan").setLevel(logging.WARNING)
    state = build_state(world_size, seed=0)
    expected = _flat(state)
    results: dict[str, Any] = {}
    for name in [*strategies, "torch-default"]:
        path = os.path.join(workdir, name)
        if name == "torch-default":
            planner = _RecordingTorchPlanner.make()
        else:
            planner = dcplan.SavePlanner(strategy=name, report=False)
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=path, planner=planner)
        save_time = time.perf_counter() - t0
        report = None
        plan_time = None
        if rank == 0:
            if name == "torch-default":
                report = build_report(planner.recorded_local, planner.recorded_global, "torch DefaultSavePlanner")
                plan_time = planner.recorded_time
            else:
                report = planner.report
                plan_time = planner.timings.get("global")
        # reload into a freshly initialised model (different seed and data)
        fresh = build_state(world_size, seed=100, data_seed=99)
        t0 = time.perf_counter()
        dcp.load(fresh, storage_reader=dcplan.FileSystemReader(path), planner=dcplan.LoadPlanner())
        load_time = time.perf_counter() - t0
        got = _flat(fresh)
        bad = sorted(k for k in expected if k not in got or not _equal(expected[k], got[k]))
        torch.distributed.barrier()
        results[name] = {
            "report": report.to_dict() if report is not None else None,
            "save_s": save_time,
            "load_s": load_time,
            "plan_s": plan_time,
            "mismatched": bad,
        }
    if load_strategies:
        results["_loads"] = {
            name: _load_with(name, os.path.join(workdir, strategies[0]), world_size, expected)
            for name in load_strategies
        }
    return results


def _load_with(load_strategy: str, path: str, world_size: int, expected: dict[str, Any]) -> dict[str, Any]:
    """Load ``path`` with a load strategy through the metered reader; bytes read, time, verdict."""
    import torch
    import torch.distributed.checkpoint as dcp

    import dcplan
    from dcplan.testing.storage import MeteredFileSystemReader

    fresh = build_state(world_size, seed=100, data_seed=99)
    reader = MeteredFileSystemReader(path)
    planner = dcplan.LoadPlanner(load_strategy=load_strategy, report=False)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    dcp.load(fresh, storage_reader=reader, planner=planner)
    load_time = time.perf_counter() - t0
    got = _flat(fresh)
    stats = getattr(planner, "load_stats", None)
    return {
        "bytes": reader.meter.bytes_read,
        "received": stats.received_bytes[torch.distributed.get_rank()] if stats is not None else 0,
        "mode": getattr(stats, "mode", "plain"),
        "load_s": load_time,
        "mismatched": sorted(k for k in expected if k not in got or not _equal(expected[k], got[k])),
    }


def _print_loads(world_size: int, per_rank: list[dict[str, Any]], checkpoint: str) -> bool:
    loads = per_rank[0].get("_loads") or {}
    if not loads:
        return True
    ok = True
    print(f"\nLoads of the `{checkpoint}` checkpoint (bytes read from the data files, counted below the reader):")
    print(f"{'load strategy':<14} " + " ".join(f"{'rank ' + str(r):>10}" for r in range(world_size))
          + f" {'total':>10} {'received':>10} {'load s':>7}  verified")
    for name in loads:
        rows = [r["_loads"][name] for r in per_rank]
        bad = sorted({k for row in rows for k in row["mismatched"]})
        ok = ok and not bad
        verdict = "bit-exact" if not bad else f"MISMATCH in {', '.join(bad[:5])}"
        if rows[0]["mode"] != "coop" and name != "default":
            verdict += " (fell back to plain reads)"
        print(f"{name:<14} " + " ".join(f"{row['bytes']:>10,}" for row in rows)
              + f" {sum(row['bytes'] for row in rows):>10,} {sum(row['received'] for row in rows):>10,}"
              f" {max(row['load_s'] for row in rows):>7.2f}  {verdict}")
    if "cooperative" not in loads:
        print("(pip install dcplan-coop-load for the `cooperative` load strategy: each stored byte is read once)")
    return ok


def _print_results(world_size: int, per_rank: list[dict[str, Any]], names: list[str], default: str) -> bool:
    r0 = per_rank[0]
    ok = True
    print(f"\nWho wrote what (bytes per rank, {world_size} ranks):")
    header = f"{'rank':>5} " + " ".join(f"{n:>16}" for n in names)
    print(header)
    for rank in range(world_size):
        cells = []
        for n in names:
            rep = r0[n]["report"]
            cells.append(f"{rep['bytes_per_rank'][rank]:>9,} B/{rep['items_per_rank'][rank]:>3}i")
        print(f"{rank:>5} " + " ".join(f"{c:>16}" for c in cells))
    print("\nBalance and times:")
    print(f"{'strategy':<16} {'busiest':>8} {'bytes':>11} {'ideal':>11} {'ratio':>6} {'plan ms':>8} "
          f"{'save s':>7} {'load s':>7}  verified")
    for n in names:
        rep = r0[n]["report"]
        save_s = max(r[n]["save_s"] for r in per_rank)
        load_s = max(r[n]["load_s"] for r in per_rank)
        bad = sorted({k for r in per_rank for k in r[n]["mismatched"]})
        ok = ok and not bad
        plan_ms = (r0[n]["plan_s"] or 0.0) * 1e3
        mark = "*" if n == default else " "
        verdict = "bit-exact" if not bad else f"MISMATCH in {', '.join(bad[:5])}"
        print(
            f"{n + mark:<16} {'rank ' + str(rep['busiest_rank']):>8} {rep['busiest_bytes']:>11,} "
            f"{rep['lower_bound']:>11,} {rep['ratio']:>6.3f} {plan_ms:>8.1f} {save_s:>7.2f} {load_s:>7.2f}  {verdict}"
        )
    print("(* = configured strategy; ideal = lower bound on the busiest rank's bytes)")
    return ok


def run_demo(world_size: int = 4, strategy: str | None = None, workdir: str | None = None) -> int:
    """Spawn ``world_size`` gloo processes, save/reload/verify, print the report. Returns an exit code."""
    if world_size < 1:
        print("dcplan demo: --world-size must be >= 1", file=sys.stderr)
        return 2
    import dcplan
    from dcplan.testing.procs import GlooPool, RankError

    cfg, _ = dcplan.resolve_config(None, {"strategy": strategy} if strategy else None)
    pm = dcplan.get_plugin_manager()
    default = cfg.strategy
    pm.get_strategy(default)  # a clear "choose one of" error before any process starts
    names = [default] + [n for n in pm.strategy_names() if n != default]
    load_names = ["default"] + [n for n in pm.load_strategies if n != "default"]
    tmp = workdir or tempfile.mkdtemp(prefix="dcplan-demo-")
    print(f"dcplan demo: {world_size} gloo processes on the CPU, checkpoints in {tmp}")
    print(f"strategies: {', '.join(names)} and torch's DefaultSavePlanner")
    t0 = time.perf_counter()
    try:
        with GlooPool(world_size, timeout=120) as pool:
            per_rank = pool.run(demo_rank, tmp, names, load_names)
    except RankError as exc:
        print(f"dcplan demo: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    ok = _print_results(world_size, per_rank, [*names, "torch-default"], default)
    ok = _print_loads(world_size, per_rank, default) and ok
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if not ok:
        print("dcplan demo: FAILED: reloaded state differs from the saved state", file=sys.stderr)
        return 1
    print("OK: every checkpoint reloaded bit-exact into a freshly initialised model.")
    return 0
