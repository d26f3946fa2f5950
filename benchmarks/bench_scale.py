"""Planning at scale: bytes on the wire and coordinator cost, torch vs dcplan, 64 to 16,384 ranks.

    python benchmarks/bench_scale.py                 # the curve (bounded: about 10 min on 2 cores)
    python benchmarks/bench_scale.py --quick         # 64 and 1,024 ranks only
    python benchmarks/bench_scale.py --memory        # also coordinator peak memory (tracemalloc; slower):
                                                     # of the step alone, and from the received bytes on
    python benchmarks/bench_scale.py --gloo 8        # also a real 8-rank gloo save, bytes counted
    python benchmarks/bench_scale.py --json out.json

Synthetic part (one process): for each workload (``dcplan.workloads`` layouts,
plus ``single``: one chunk per rank), every rank's local step is simulated as a
real save runs it. Ranks with the same plan share one encoding (they compute
the same thing in parallel); the digest exchange's outcome is computed from the
digests (:func:`dcplan.save.exchange.refs_from`). What each rank would send is
pickled as torch's ``gather_object`` pickles it, and the coordinator step is
timed on exactly what the coordinator would unpickle: for dcplan,
``SavePlanner.create_global_plan`` on the compact plans (decode, dedup,
metadata, validation, report, encode of the final plans); for torch,
``DefaultSavePlanner.create_global_plan`` on the full plans (dedup, metadata,
validation). Both get ``planner_data={}`` as mapping (the real mapping adds
the same bytes to both, once per distinct plan for dcplan).

Real part (``--gloo N``): N gloo processes save a DDP-like and an FSDP-like
state with torch's ``DefaultSavePlanner`` and with ``dcplan.SavePlanner``; the
bytes through the plan step's gather/scatter and dcplan's digest exchange are
counted by wrapping them (:mod:`dcplan.testing.wirecount`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import sys
import time
import tracemalloc
from typing import Any

CURVE: tuple[tuple[str, str, int | None], ...] = (
    ("single", "-", 64),
    ("single", "-", 1024),
    ("single", "-", 4096),
    ("single", "-", 16384),
    ("ddp", "1b", 64),
    ("ddp", "1b", 1024),
    ("ddp", "1b", 4096),
    ("ddp", "1b", 16384),
    ("hsdp8", "70b", 64),
    ("hsdp8", "70b", 1024),
    ("hsdp64", "70b", 1024),
    ("hsdp8", "8b", 4096),
    ("hsdp8", "1b", 16384),
    ("tp8pp8dp1", "70b", None),
    ("tp8pp8dp16", "70b", None),
    ("tp8pp8dp64", "70b", None),
    ("tp8pp4dp512", "8b", None),
    ("fsdp", "7b", 64),
    ("fsdp", "70b", 1024),
    ("fsdp", "1b", 4096),
)
QUICK = tuple(c for c in CURVE if (c[2] or 0) <= 1024 and "70b" not in c[1]) + (("tp8pp8dp16", "70b", None),)
#: torch's coordinator step is skipped above this many entries (it takes minutes; see README)
TORCH_MAX_ENTRIES = 3_000_000


def single_chunk(world: int) -> list[Any]:
    """One shard of one tensor per rank (the smallest plan a rank can send)."""
    import torch

    from dcplan.compat import SavePlan
    from dcplan.workloads import _item

    return [SavePlan([_item("w", (world * 4, 16), (r * 4, 0), (4, 16), torch.float32)]) for r in range(world)]


def make(layout: str, model: str, world: int | None) -> Any:
    from dcplan import workloads

    if layout == "single":
        assert world is not None
        return workloads.Workload(name=f"single-chunk x{world}", plans=single_chunk(world))
    return workloads.make(layout, model, world)


def simulate_ranks(plans: list[Any]) -> dict[str, Any]:
    """What every rank sends (dcplan and torch), built once per distinct plan."""
    from dcplan import compat
    from dcplan.save import exchange, wire
    from dcplan.save.local import plan_digest
    from dcplan.save.planner import RankPayload, SavePlanner

    agreement = SavePlanner(report=False).agreement()
    groups: dict[Any, int] = {}
    encoded: dict[int, tuple[Any, bytes, float]] = {}
    digests = []
    rank_secs = 0.0
    if plans:  # warm up (first-call imports and caches would count as one rank's time)
        wire.encode_items(plans[0].items)
        plan_digest(plans[0].items)
    # a rank encodes only its own plan: a full collection of this process's heap (every
    # simulated rank's objects) landing inside one rank's timing is not that rank's cost
    gc_was = gc.isenabled()
    gc.disable()
    for r, p in enumerate(plans):
        g = groups.setdefault(tuple(map(id, p.items)), r)
        if g == r:
            t0 = time.perf_counter()
            enc = wire.encode_items(p.items)
            pd = plan_digest(p.items)
            d = enc.digest() + exchange.meta_digest(RankPayload(mapping={}, agreement=agreement, digest=pd))
            secs = time.perf_counter() - t0
            rank_secs = max(rank_secs, secs)
            encoded[r] = (enc, pd, secs)
            digests.append(d)
        else:
            digests.append(digests[g])
    if gc_was:
        gc.enable()
    refs, meta_refs = exchange.plan_refs(digests)
    sent, sizes, torch_sizes, torch_plans = [], [], [], []
    size_of: dict[tuple[int, bool], int] = {}
    for r, p in enumerate(plans):
        g = groups[tuple(map(id, p.items))]
        enc, pd, _ = encoded[g]
        payload = RankPayload(mapping={}, agreement=agreement, digest=pd)
        msg = wire.pack_local(p, payload, enc, refs[r], meta_ref=meta_refs[r])
        sent.append(msg)
        key = (g, refs[r] is None, meta_refs[r] is None)
        if key not in size_of:
            size_of[key] = len(pickle.dumps(msg))
        sizes.append(size_of[key])
        tp = compat.replace_plan(p, planner_data={})
        torch_plans.append(tp)
        if (g, "t") not in size_of:
            size_of[(g, "t")] = len(pickle.dumps(tp))  # type: ignore[index]
        torch_sizes.append(size_of[(g, "t")])  # type: ignore[index]
    return {
        "sent": sent,
        "torch_plans": torch_plans,
        "gathered": sum(sizes),
        "torch_gathered": sum(torch_sizes),
        "exchanged": len(plans) * len(pickle.dumps(digests[0])),
        "rank_seconds": rank_secs,
        "distinct": len(encoded),
    }


def output_floor(metadata: Any, world: int) -> float:
    """Seconds to build only what torch's protocol makes a coordinator return, from plain ints.

    That is one ``SavePlan`` per rank and the ``Metadata``: one
    ``TensorStorageMetadata`` per tensor and one ``ChunkStorageMetadata`` (two
    ``torch.Size``) per chunk written. No planner that returns torch's objects
    can take less; ``torch's time / floor`` bounds any speed-up over torch.
    """
    import torch

    from dcplan.compat import BytesStorageMetadata, ChunkStorageMetadata, Metadata, SavePlan, TensorStorageMetadata

    specs = [
        (fqn, None, (), [])
        if not isinstance(m, TensorStorageMetadata)
        else (fqn, m.properties, tuple(m.size), [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks])
        for fqn, m in metadata.state_dict_metadata.items()
    ]
    gc.collect()
    t0 = time.perf_counter()
    md: dict[str, Any] = {}
    size_of = torch.Size
    for fqn, props, size, chunks in specs:
        if props is None:
            md[fqn] = BytesStorageMetadata()
            continue
        md[fqn] = TensorStorageMetadata(
            properties=props,
            size=size_of(size),
            chunks=[ChunkStorageMetadata(offsets=size_of(o), sizes=size_of(z)) for o, z in chunks],
        )
    Metadata(state_dict_metadata=md)
    [SavePlan([]) for _ in range(world)]
    return time.perf_counter() - t0


def _timed(fn: Any, memory: bool) -> tuple[float, Any, int | None]:
    from dcplan.save.cache import clear_plan_caches

    clear_plan_caches()  # (the PlanIndex has no cache of its own: it is an argument)
    gc.collect()
    if memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    peak = None
    if memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return secs, out, peak


def bench(layout: str, model: str, world: int | None, memory: bool, with_torch: bool) -> dict[str, Any]:
    from dcplan import compat
    from dcplan.save.planner import SavePlanner

    wl = make(layout, model, world)
    entries = wl.entries
    sim = simulate_ranks(wl.plans)
    planner = SavePlanner(report=False)
    received = pickle.loads(pickle.dumps(sim["sent"]))  # what the coordinator unpickles
    secs, (delta, _md), _ = _timed(lambda: planner.create_global_plan(received), False)
    received = None
    scattered = sum(len(pickle.dumps(p)) for p in delta)
    floor = output_floor(_md, wl.world_size)
    del delta, _md
    row: dict[str, Any] = {
        "workload": wl.name,
        "ranks": wl.world_size,
        "entries": entries,
        "distinct_plans": sim["distinct"],
        "dcplan": {
            "gathered": sim["gathered"],
            "exchanged": sim["exchanged"],
            "scattered": scattered,
            "coordinator_s": secs,
            "rank_s": sim["rank_seconds"],
            "floor_s": floor,
        },
    }
    if memory:
        again = pickle.loads(pickle.dumps(sim["sent"]))
        _, out, peak = _timed(lambda: SavePlanner(report=False).create_global_plan(again), True)
        del out, again
        row["dcplan"]["peak_bytes"] = peak
        # the same, starting from the bytes the coordinator receives (each rank's pickle, as
        # gather_object delivers them): unpickling the gathered plans is part of planning's memory
        wire_bytes = [pickle.dumps(m) for m in sim["sent"]]
        _, out, peak = _timed(
            lambda: SavePlanner(report=False).create_global_plan([pickle.loads(b) for b in wire_bytes]), True
        )
        del out, wire_bytes
        row["dcplan"]["peak_from_bytes"] = peak
    if with_torch and entries <= TORCH_MAX_ENTRIES:
        tplanner = compat.torch_default_save_planner()
        tsecs, (tglobal, _tmd), _ = _timed(lambda: compat.torch_create_global_plan(tplanner, sim["torch_plans"]), False)
        tscattered = sum(len(pickle.dumps(p)) for p in tglobal)
        del tglobal, _tmd
        row["torch"] = {"gathered": sim["torch_gathered"], "scattered": tscattered, "coordinator_s": tsecs}
        if memory:
            tplanner = compat.torch_default_save_planner()
            _, out, tpeak = _timed(lambda: compat.torch_create_global_plan(tplanner, sim["torch_plans"]), True)
            del out
            row["torch"]["peak_bytes"] = tpeak
            tbytes = [pickle.dumps(p) for p in sim["torch_plans"]]
            tplanner = compat.torch_default_save_planner()
            _, out, tpeak = _timed(
                lambda: compat.torch_create_global_plan(tplanner, [pickle.loads(b) for b in tbytes]), True
            )
            del out, tbytes
            row["torch"]["peak_from_bytes"] = tpeak
    else:
        row["torch"] = {"gathered": sim["torch_gathered"]}
    return row


def _fmt(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for u, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= f:
            return f"{n / f:.1f} {u}{unit}"
    return f"{n:.0f} {unit}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| workload | ranks | entries | distinct plans | gathered torch / dcplan (B/entry dcplan) | scattered torch / dcplan "
        "| coordinator torch / dcplan (speedup) | output floor (torch / floor) | per-rank dcplan "
        "| peak mem torch / dcplan | peak from received bytes torch / dcplan |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        d, t = r["dcplan"], r["torch"]
        g = d["gathered"] + d["exchanged"]
        ratio = t["coordinator_s"] / d["coordinator_s"] if "coordinator_s" in t else None
        sp = "" if ratio is None else f" ({ratio:.0f}x)" if ratio >= 10 else f" ({ratio:.2g}x)"
        bound = f" ({t['coordinator_s'] / d['floor_s']:.0f}x)" if "coordinator_s" in t and d["floor_s"] > 0 else ""
        tsecs = f"{t['coordinator_s']:.3f} s" if "coordinator_s" in t else "-"
        lines.append(
            f"| {r['workload']} | {r['ranks']:,} | {r['entries']:,} | {r['distinct_plans']:,} "
            f"| {_fmt(t['gathered'], 'B')} / {_fmt(g, 'B')} ({g / max(1, r['entries']):.1f}) "
            f"| {_fmt(t.get('scattered'), 'B')} / {_fmt(d['scattered'], 'B')} "
            f"| {tsecs} / {d['coordinator_s']:.3f} s{sp} "
            f"| {d['floor_s']:.3f} s{bound} "
            f"| {d['rank_s'] * 1e3:.2f} ms "
            f"| {_fmt(t.get('peak_bytes'), 'B')} / {_fmt(d.get('peak_bytes'), 'B')} "
            f"| {_fmt(t.get('peak_from_bytes'), 'B')} / {_fmt(d.get('peak_from_bytes'), 'B')} |"
        )
    return "\n".join(lines)


def gloo_rows(world: int) -> list[dict[str, Any]]:
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
    import _wire_fns as F

    from dcplan.testing.procs import GlooPool

    rows = []
    with GlooPool(world, timeout=600) as pool:
        for kind in ("ddp", "sharded"):
            for planner in ("torch", "dcplan"):
                with tempfile.TemporaryDirectory() as d:
                    res = pool.run(F.save_load, os.path.join(d, "ck"), kind, planner)
                c = [r["count"] for r in res]
                rows.append(
                    {
                        "state": kind,
                        "planner": planner,
                        "gathered": sum(x["gathered"] for x in c),
                        "exchanged": sum(x["exchanged"] for x in c),
                        "scattered": c[0]["scattered"],
                        "reloaded_bit_exact": all(r["equal_dcplan"] and r["equal_torch"] for r in res),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory with tracemalloc")
    ap.add_argument("--no-torch", action="store_true", help="skip torch's coordinator step")
    ap.add_argument("--only", default=None, help="substring of the workload spec (e.g. hsdp)")
    ap.add_argument("--gloo", type=int, default=0, help="also run a real N-rank gloo save")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    # warm-up, not recorded: the first coordinator step of a process pays for lazy imports (about 10 ms),
    # which would otherwise land on whichever row comes first
    bench("single", "-", 8, False, not args.no_torch)
    rows = []
    for layout, model, world in QUICK if args.quick else CURVE:
        if args.only and args.only not in f"{layout} {model} {world}":
            continue
        row = bench(layout, model, world, args.memory, not args.no_torch)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        gc.collect()
    print()
    print(table(rows))
    out: dict[str, Any] = {"synthetic": rows}
    if args.gloo:
        out["gloo"] = gloo_rows(args.gloo)
        for r in out["gloo"]:
            print(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
