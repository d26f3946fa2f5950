"""Issue 15: balance of ``size_balanced`` (balanced) against torch's greedy and plain LPT, and ``split``.

    python benchmarks/bench_balance.py --quick          # small workloads, 300 random layouts (~1 min)
    python benchmarks/bench_balance.py                  # the benchmark workloads + 2000 random layouts
    python benchmarks/bench_balance.py --random 5000 --max-world 256

Prints three tables:

1. per workload (:data:`dcplan.workloads.STANDARD`, now with expert-parallel and
   uneven-pipeline layouts): busiest rank / lower bound for torch's greedy
   (``compat.torch_dedup_save_plans``), plain LPT (every item largest first to
   its least-loaded holder, written here independently), ``balanced`` and
   ``split`` (against the divisible bound), and the dedup time of ``balanced``
   against torch's ``dedup_save_plans`` (index build included, cold);
2. a random-layout summary (:func:`dcplan.workloads.random_layouts`): wins,
   ties and losses of ``balanced`` against each reference (torch's greedy, plain
   LPT, the best of 12 LPT variants), and the worst ratio;
3. which portfolio entry the local search started from, how often;
4. ``split`` against the exact divisible bound on random mixed-style layouts of
   64-256 ranks (``--split-random``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any


def lpt_busiest(plans: Any, idx: Any, fixed_first: bool = False, order: str = "first", tie: str = "low") -> int:
    """Plain LPT on the index (largest first, stable; least-loaded holder, ties lowest rank).

    Variants: ``fixed_first`` (single-holder items counted first), ``order="last"`` (equal sizes: last
    seen first), ``tie`` "high" (highest rank) or "torch" (``min`` over the ``set`` of holders)."""
    import numpy as np

    nb = idx.nbytes
    load = [0] * idx.world_size
    keys = np.arange(len(nb))
    if order == "last":
        keys = keys[::-1]
    seq = keys[np.argsort(-np.asarray(nb, dtype=np.int64)[keys], kind="stable")].tolist()
    if fixed_first:
        for k in seq:
            if len(idx.holders[k]) == 1:
                load[idx.holders[k][0]] += nb[k]
        seq = [k for k in seq if len(idx.holders[k]) > 1]
    for k in seq:
        hs = idx.holders[k]
        if len(hs) == 1:
            r = hs[0]
        elif tie == "torch":
            r = min(set(hs), key=load.__getitem__)
        else:
            r = min(hs, key=lambda r: (load[r], r if tie == "low" else -r))
        load[r] += nb[k]
    return max(load, default=0)


def lpt_variants_busiest(plans: Any, idx: Any) -> int:
    """The best of 12 LPT variants (fixed first or not x equal-size order x holder ties)."""
    return min(
        lpt_busiest(plans, idx, ff, order, tie)
        for ff in (False, True)
        for order in ("first", "last")
        for tie in ("low", "high", "torch")
    )


def _time(fn: Any) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_workload(wl: Any) -> dict[str, Any]:
    from dcplan import compat
    from dcplan.save.index import PlanIndex
    from dcplan.save.report import build_report
    from dcplan_size_balanced import balanced
    from dcplan_split import split

    t_torch, torch_out = _time(lambda: compat.torch_dedup_save_plans(wl.plans))
    t_bal, bal_out = _time(lambda: balanced(wl.plans, index=PlanIndex(wl.plans)))
    idx = PlanIndex(wl.plans)
    rt = build_report(wl.plans, torch_out, index=idx)
    del torch_out
    rb = build_report(wl.plans, bal_out, index=idx)
    del bal_out
    rs = build_report(wl.plans, split(wl.plans, index=idx), index=idx)
    lb = rt.lower_bound
    return {
        "workload": wl.name,
        "world": wl.world_size,
        "entries": wl.entries,
        "torch": rt.busiest_bytes / lb,
        "lpt": lpt_busiest(wl.plans, idx) / lb,
        "balanced": rb.busiest_bytes / lb,
        "split_div": rs.busiest_bytes / rs.divisible_bound,
        "t_torch": t_torch,
        "t_balanced": t_bal,
    }


def random_summary(count: int, seed: int, min_world: int, max_world: int) -> dict[str, Any]:
    from dcplan import compat, workloads
    from dcplan.save.index import PlanIndex
    from dcplan.save.report import build_report
    from dcplan_size_balanced import balanced_solution

    tally = {"torch": [0, 0, 0], "lpt": [0, 0, 0], "lpt_variants": [0, 0, 0]}
    worst = {"torch": 0.0, "lpt": 0.0, "lpt_variants": 0.0}
    best = {"torch": 1.0, "lpt": 1.0, "lpt_variants": 1.0}
    starts: dict[str, int] = {}
    gap = 0.0
    for wl in workloads.random_layouts(count, seed=seed, min_world=min_world, max_world=max_world):
        idx = PlanIndex(wl.plans)
        sol = balanced_solution(idx)
        ours = build_report(wl.plans, idx.apply_owners(wl.plans, sol.owner), index=idx)
        refs = {
            "torch": build_report(wl.plans, compat.torch_dedup_save_plans(wl.plans), index=idx).busiest_bytes,
            "lpt": lpt_busiest(wl.plans, idx),
            "lpt_variants": lpt_variants_busiest(wl.plans, idx),
        }
        for name, ref in refs.items():
            b = ours.busiest_bytes
            tally[name][0 if b < ref else 1 if b == ref else 2] += 1
            worst[name] = max(worst[name], b / ref)
            best[name] = min(best[name], b / ref)
        starts[sol.start] = starts.get(sol.start, 0) + 1
        gap = max(gap, ours.ratio)
    return {"count": count, "tally": tally, "worst": worst, "best": best, "starts": starts, "worst_vs_lb": gap}


def _sub_row(it: Any, held: dict[str, set[tuple[tuple[int, ...], tuple[int, ...]]]]) -> bool:
    """Whether a written slice is part of a row (of the first dimension > 1) of the chunk it comes from."""
    td = it.tensor_data
    if td is None or td.chunk is None:
        return False
    offs, sizes = tuple(td.chunk.offsets), tuple(td.chunk.sizes)
    for co, cs in sorted(held.get(it.index.fqn, ())):
        if all(a <= o and o + s <= a + b for o, s, a, b in zip(offs, sizes, co, cs)):
            d = next((i for i, x in enumerate(cs) if x > 1), len(cs))
            return any(s < c for s, c in zip(sizes[d + 1:], cs[d + 1:]))
    return False


def split_summary(count: int, seed: int) -> dict[str, Any]:
    """``split`` (auto) / the exact divisible bound on random mixed-style layouts of 64-256 ranks
    (items 4 KiB .. 1 GiB, small models included). "cut-free" bound: the divisible bound, or the
    largest replicated item no strategy can cut (objects, 0-d tensors) when larger. Also the writes:
    in all, and how many are rectangles of a sub-row cut (part of a row of their tensor)."""
    from dcplan import workloads
    from dcplan.save.index import PlanIndex
    from dcplan.save.report import build_report
    from dcplan_split import split, split_dim

    worst_all = worst_cut_free = 0.0
    mixed = over = writes = sub_row = 0
    t = 0.0
    for wl in workloads.random_layouts(count, seed=seed, min_world=64, max_world=256):
        idx = PlanIndex(wl.plans)
        t0 = time.perf_counter()
        out = split(wl.plans, index=idx)
        t += time.perf_counter() - t0
        rep = build_report(wl.plans, out, index=idx)
        uncut = [idx.nbytes[k] for k, hs in enumerate(idx.holders) if len(hs) > 1 and split_dim(idx.first[k]) is None]
        r = rep.busiest_bytes / max([rep.divisible_bound, *uncut])
        worst_all = max(worst_all, rep.divisible_ratio)
        worst_cut_free = max(worst_cut_free, r)
        over += r > 1.005
        mixed += "+" in wl.name
        held: dict[str, set[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for p in wl.plans:
            for it in p.items:
                if it.tensor_data is not None and it.tensor_data.chunk is not None:
                    c = it.tensor_data.chunk
                    held.setdefault(it.index.fqn, set()).add((tuple(c.offsets), tuple(c.sizes)))
        for p in out:
            writes += len(p.items)
            sub_row += sum(_sub_row(it, held) for it in p.items)
    return {"count": count, "mixed": mixed, "worst_cut_free": worst_cut_free, "worst_all": worst_all,
            "over": over, "time": t, "writes": writes, "sub_row": sub_row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads and 300 random layouts")
    parser.add_argument("--random", type=int, default=None, help="random layouts (default 300 quick, 2000 full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-world", type=int, default=2)
    parser.add_argument("--max-world", type=int, default=64)
    parser.add_argument("--split-random", type=int, default=None,
                        help="random layouts of 64-256 ranks for split (default 100 quick, 300 full)")
    parser.add_argument("--only", default=None, metavar="TEXT", help="only workloads whose name contains TEXT")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from dcplan import workloads

    print(f"# dcplan balance (issue 15), torch {torch.__version__}, python {sys.version.split()[0]}\n")
    print("| workload | ranks | entries | torch greedy | LPT | balanced | split (/ divisible LB) "
          "| balanced time | torch dedup time | time vs torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for wl in workloads.standard_workloads(quick=args.quick, only=args.only):
        r = bench_workload(wl)
        print(f"| {r['workload']} | {r['world']} | {r['entries']:,} | {r['torch']:.3f} | {r['lpt']:.3f} | "
              f"{r['balanced']:.3f} | {r['split_div']:.4f} | {r['t_balanced']:.3f} s | {r['t_torch']:.3f} s | "
              f"{r['t_balanced'] / r['t_torch']:.2f}x |", flush=True)
        del wl
        gc.collect()
    count = args.random if args.random is not None else (300 if args.quick else 2000)
    if count:
        s = random_summary(count, args.seed, args.min_world, args.max_world)
        print(f"\n## {count} random layouts (seed {args.seed}, {args.min_world}-{args.max_world} ranks)\n")
        print("| reference | wins | ties | losses | worst balanced / reference | best |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in ("torch", "lpt", "lpt_variants"):
            w, t, lo = s["tally"][name]
            print(f"| {name} | {w} | {t} | {lo} | {s['worst'][name]:.4f} | {s['best'][name]:.4f} |")
        print(f"\nworst balanced / lower bound: {s['worst_vs_lb']:.4f}; local search started from: "
              + ", ".join(f"{k} {v}" for k, v in sorted(s["starts"].items())))
    count = args.split_random if args.split_random is not None else (100 if args.quick else 300)
    if count:
        s = split_summary(count, args.seed)
        print(f"\n## split on {count} random layouts of 64-256 ranks (seed {args.seed}, {s['mixed']} of mixed styles)\n")
        print(f"busiest / exact divisible bound: worst {s['worst_cut_free']:.4f} against the cut-free bound "
              f"({s['over']} above 1.005), worst {s['worst_all']:.4f} against the divisible bound alone "
              f"(objects cannot be cut); {s['writes']:,} writes, {s['sub_row']:,} of them sub-row rectangles; "
              f"split time {s['time']:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
