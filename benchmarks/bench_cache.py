"""Plan caching benchmark: repeated saves of one structure on real gloo processes.

Four ranks (DDP-like: every rank holds every tensor, plus a few rank-local
ones) save a state of a few thousand tensors five times, each to a new
directory, with:

* ``torch``: torch's ``DefaultSavePlanner()`` (the baseline);
* ``torch_cache``: ``DefaultSavePlanner(enable_plan_caching=True)`` (torch 2.7+);
* ``dcplan``: ``dcplan.SavePlanner()`` without caching;
* ``dcplan_cache``: ``dcplan.SavePlanner(plan_cache=True)``.

For each save it reports the coordinator's planning time (``create_global_plan``),
the bytes gathered on the coordinator (pickled local plans) and scattered back
(pickled global plans), and the slowest rank's local planning time. Times are
also given as ratios: repeated save / first save of the same planner, and
against torch's uncached planner measured in the same run.

Run::

    python benchmarks/bench_cache.py [--tensors 3000] [--saves 5] [--world 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from typing import Any

MODES = ("torch", "torch_cache", "dcplan", "dcplan_cache")


class _Measured:
    """Mixin recording what the coordinator gathers, scatters and spends planning."""

    def create_local_plan(self) -> Any:
        t0 = time.perf_counter()
        plan = super().create_local_plan()  # type: ignore[misc]
        self.bench_local = time.perf_counter() - t0
        return plan

    def create_global_plan(self, all_plans: list[Any]) -> Any:
        self.bench_gathered = sum(len(pickle.dumps(p)) for p in all_plans)
        t0 = time.perf_counter()
        delta, metadata = super().create_global_plan(all_plans)  # type: ignore[misc]
        self.bench_global = time.perf_counter() - t0
        self.bench_scattered = sum(len(pickle.dumps(p)) for p in delta)
        return delta, metadata


def _planner_factory(mode: str, tag: str) -> Any:
    import dcplan
    from dcplan import compat

    if mode.startswith("torch"):
        # torch keys its class-level plan cache by class name: one fresh class per run
        cls = type(f"BenchTorch_{mode}_{tag}", (_Measured, compat.DefaultSavePlanner), {})
        kwargs = {"enable_plan_caching": True} if mode == "torch_cache" else {}
        return lambda: cls(**kwargs)
    cls = type(f"BenchDcplan_{mode}", (_Measured, dcplan.SavePlanner), {})
    cfg = dcplan.Config(plan_cache=mode == "dcplan_cache", report=False)
    return lambda: cls(cfg)


def has_torch_plan_caching() -> bool:
    import inspect

    from dcplan import compat

    return "enable_plan_caching" in inspect.signature(compat.DefaultSavePlanner.__init__).parameters


def make_state(rank: int, n: int) -> dict[str, Any]:
    import torch

    sd: dict[str, Any] = {}
    for i in range(n):
        # mixed sizes so that dedup has something to balance
        sd[f"layers.{i // 4}.p{i % 4}"] = torch.zeros(4 + (i * 37) % 60)
    sd[f"rank_local.{rank}"] = torch.zeros(8)
    sd["step"] = 10
    return sd


def rank_bench(rank: int, world: int, root: str, n: int, saves: int, modes: list[str], tag: str) -> list[dict[str, Any]]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from dcplan.save.cache import clear_plan_caches

    clear_plan_caches()
    sd = make_state(rank, n)
    rows = []
    for mode in modes:
        new_planner = _planner_factory(mode, tag)
        for i in range(saves):
            planner = new_planner()
            dist.barrier()
            t0 = time.perf_counter()
            dcp.save(sd, storage_writer=FileSystemWriter(os.path.join(root, f"{mode}_{i}")), planner=planner)
            wall = time.perf_counter() - t0
            row = {"mode": mode, "save": i, "local": planner.bench_local, "wall": wall}
            if rank == 0:
                row.update(
                    {"global": planner.bench_global, "gathered": planner.bench_gathered,
                     "scattered": planner.bench_scattered}
                )
                cache = getattr(planner, "cache", None)
                row["outcome"] = getattr(cache, "outcome", None)
            rows.append(row)
    return rows


def summarize(all_rows: list[list[dict[str, Any]]], modes: list[str], saves: int) -> dict[str, Any]:
    coord = all_rows[0]
    out: dict[str, Any] = {}
    for mode in modes:
        rows = [r for r in coord if r["mode"] == mode]
        local = [max(rr[k]["local"] for rr in all_rows) for k, r in enumerate(coord) if r["mode"] == mode]
        first = rows[0]["global"]
        later = [r["global"] for r in rows[1:]]
        out[mode] = {
            "global_s": [r["global"] for r in rows],
            "gathered_B": [r["gathered"] for r in rows],
            "scattered_B": [r["scattered"] for r in rows],
            "local_max_s": local,
            "wall_s": [r["wall"] for r in rows],
            "outcome": [r.get("outcome") for r in rows],
            "repeat_over_first": (statistics.median(later) / first) if later and first else None,
        }
    base = out.get("torch")
    if base:
        for mode in modes:
            ratios = [a / b if b else None for a, b in zip(out[mode]["global_s"], base["global_s"])]
            out[mode]["global_vs_torch"] = ratios
    return out


def print_table(summary: dict[str, Any], world: int, n: int) -> None:
    print(f"\nplan caching: {world} gloo ranks, {n} replicated tensors (+1 rank-local each, 1 object)")
    print(f"{'mode':<13} {'save':>4} {'coord plan ms':>13} {'vs torch':>9} {'gathered B':>11} "
          f"{'scattered B':>12} {'local ms':>9} {'outcome':>8}")
    for mode, s in summary.items():
        for i, g in enumerate(s["global_s"]):
            vt = s.get("global_vs_torch", [None] * len(s["global_s"]))[i]
            print(
                f"{mode:<13} {i + 1:>4} {g * 1e3:>13.2f} {'' if vt is None else f'{vt:.3f}':>9} "
                f"{s['gathered_B'][i]:>11,} {s['scattered_B'][i]:>12,} {s['local_max_s'][i] * 1e3:>9.1f} "
                f"{s['outcome'][i] or '':>8}"
            )
        r = s["repeat_over_first"]
        print(f"{'':<13} repeated/first coordinator planning (median): {'n/a' if r is None else f'{r:.4f}'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=3000)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_cache as B  # the workers import the functions from this module

    from dcplan.testing.procs import GlooPool

    modes = [m for m in MODES if m != "torch_cache" or has_torch_plan_caching()]
    if "torch_cache" not in modes:
        print("torch_cache skipped: this torch (< 2.7) has no DefaultSavePlanner(enable_plan_caching=...)")
    with tempfile.TemporaryDirectory() as root, GlooPool(args.world, timeout=1800) as pool:
        tag = os.urandom(3).hex()
        rows = pool.run(B.rank_bench, root, args.tensors, args.saves, modes, tag)
    summary = summarize(rows, modes, args.saves)
    import torch

    print_table(summary, args.world, args.tensors)
    print(f"torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "world": args.world, "tensors": args.tensors, "modes": summary},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
