"""Cooperative load benchmark: torch's default load vs ``cooperative`` on slow storage.

Four gloo ranks load the same checkpoint through
:class:`dcplan.testing.storage.MeteredFileSystemReader`, which throttles each rank's
reads to ``--bandwidth-mib`` MiB/s (a stand-in for per-node storage limits) and counts
the bytes each rank actually pulls from the data files (below the reader). Layouts:

* ``ddp``: every rank holds every tensor (4 replicas);
* ``hsdp``: DTensors on a 2x2 mesh, ``[Replicate(), Shard(0)]`` (2 replicas of 2 shards);
* ``fsdp``: DTensors ``Shard(0)`` over the 4 ranks (nothing shared: ``cooperative``
  must fall back to plain reads).

For each layout, torch's ``DefaultLoadPlanner`` and ``dcplan.LoadPlanner(load_strategy=
"cooperative")`` load in the same run (best of ``--repeats``); the results are checked
bit-exact against each other on every rank. Reported: total bytes read / bytes stored
(the data files' size), the slowest rank's load time and the speed-up.

Run::

    python benchmarks/bench_coop_load.py [--size-mib 64] [--bandwidth-mib 32] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

LAYOUTS = ("ddp", "hsdp", "fsdp")
MODES = ("torch", "cooperative")


def _state(layout: str, world: int, size_mib: int, seed: int) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from dcplan import compat

    Replicate, Shard = compat.dtensor_placements()
    g = torch.Generator().manual_seed(seed)
    n = max(1, size_mib // 2)  # 2 MiB tensors
    tensors = {f"layer{i}.weight": torch.randn(1024, 512, generator=g) for i in range(n)}
    tensors["step"] = torch.tensor(float(seed))
    sd: dict[str, Any] = {"meta": {"epoch": seed, "name": "bench"}}
    if layout == "ddp":
        sd["model"] = tensors
        return sd
    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2))
        placements = [Replicate(), Shard(0)]
    else:
        mesh = init_device_mesh("cpu", (world,))
        placements = [Shard(0)]
    sd["model"] = {
        k: (compat.distribute_tensor(v, mesh, placements) if v.dim() else v) for k, v in tensors.items()
    }
    return sd


def _digest(sd: dict[str, Any]) -> str:
    import torch

    from dcplan import compat

    h = hashlib.sha256()
    flat, _ = compat.flatten_state_dict(sd)
    for key in sorted(flat):
        v = flat[key]
        if isinstance(v, compat.DTensor):
            v = v.to_local()
        if isinstance(v, torch.Tensor):
            h.update(key.encode() + v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{key}={v!r}".encode())
    return h.hexdigest()


def save_rank(rank: int, world: int, path: str, layout: str, size_mib: int) -> None:
    import torch.distributed.checkpoint as dcp

    from dcplan import compat

    sd = _state(layout, world, size_mib, seed=0)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(path), planner=compat.torch_default_save_planner())


def load_rank(rank: int, world: int, path: str, layout: str, size_mib: int, mode: str, bandwidth: float) -> dict[str, Any]:
    import logging

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import dcplan
    from dcplan import compat
    from dcplan.testing.storage import MeteredFileSystemReader

    logging.getLogger("dcplan").setLevel(logging.WARNING)
    sd = _state(layout, world, size_mib, seed=1)
    reader = MeteredFileSystemReader(path, bandwidth=bandwidth)
    planner: Any
    if mode == "torch":
        planner = compat.torch_default_load_planner()
    else:
        planner = dcplan.LoadPlanner(load_strategy=mode)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(sd, storage_reader=reader, planner=planner)
    seconds = time.perf_counter() - t0
    stats = getattr(planner, "load_stats", None)
    return {
        "bytes": reader.meter.bytes_read,
        "seconds": seconds,
        "digest": _digest(sd),
        "mode": stats.mode if stats is not None else "plain",
        "reason": stats.reason if stats is not None else "",
    }


def run(world: int, size_mib: int, bandwidth_mib: float, repeats: int) -> list[dict[str, Any]]:
    from dcplan.testing.procs import GlooPool

    rows = []
    root = tempfile.mkdtemp(prefix="dcplan-coop-bench-")
    try:
        with GlooPool(world, timeout=600) as pool:
            for layout in LAYOUTS:
                path = os.path.join(root, layout)
                pool.run(save_rank, path, layout, size_mib)
                stored = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))
                digests = {}
                for mode in MODES:
                    best = None
                    for _ in range(repeats):
                        res = pool.run(load_rank, path, layout, size_mib, mode, bandwidth_mib * 2**20)
                        slowest = max(r["seconds"] for r in res)
                        if best is None or slowest < best[0]:
                            best = (slowest, res)
                    assert best is not None
                    slowest, res = best
                    digests[mode] = [r["digest"] for r in res]
                    rows.append({
                        "layout": layout,
                        "mode": mode,
                        "stored_bytes": stored,
                        "bytes_per_rank": [r["bytes"] for r in res],
                        "total_bytes": sum(r["bytes"] for r in res),
                        "read_ratio": sum(r["bytes"] for r in res) / stored,
                        "slowest_s": slowest,
                        "plan": res[0]["mode"],
                        "reason": res[0]["reason"],
                    })
                base = rows[-len(MODES)]
                for row in rows[-len(MODES):]:
                    row["speedup"] = base["slowest_s"] / row["slowest_s"]
                    row["bit_exact"] = digests[row["mode"]] == digests["torch"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=64, help="model size (2 MiB tensors)")
    ap.add_argument("--bandwidth-mib", type=float, default=32.0, help="per-rank read bandwidth, MiB/s")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    rows = run(args.world, args.size_mib, args.bandwidth_mib, args.repeats)
    print(f"torch {torch.__version__}, {args.world} gloo ranks, {args.size_mib} MiB model, "
          f"{args.bandwidth_mib:g} MiB/s per rank, best of {args.repeats}\n")
    print("| layout | load | plan | total read / stored | bytes read per rank (MiB) | slowest rank | speed-up | bit-exact |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        per = ", ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_rank"])
        print(f"| {r['layout']} | {r['mode']} | {r['plan']} | {r['read_ratio']:.3f} | {per} | "
              f"{r['slowest_s']:.2f} s | {r['speedup']:.2f}x | {'yes' if r['bit_exact'] else 'NO'} |")
        ok = ok and r["bit_exact"]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
