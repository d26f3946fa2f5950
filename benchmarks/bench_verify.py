"""Verification share: the core's checks around the strategy vs the whole coordinator step (issue 13).

    python benchmarks/bench_verify.py                      # 70b hsdp8 x512 (1.5M) and 7b ddp x4096 (4.8M)
    python benchmarks/bench_verify.py --only ddp --repeat 5
    python benchmarks/bench_verify.py --profile split      # cProfile of the checks, split strategy

For each workload and each strategy (``size_balanced``, the default, and
``split``) it times, on the same plans as ranks send them (each with its
``RankPayload`` and plan digest):

* the whole coordinator step, ``dcplan.SavePlanner(strategy=...).create_global_plan(sent)``;
* the verification inside it, alone: :func:`dcplan.save.verify.check_consistency`
  (before dedup) and :func:`dcplan.save.verify.verify_dedup` (after dedup), with
  the same index the step builds.

Target (issue 13): verification <= 10 % of the coordinator step at 2M plan entries
(PASS/MISS on the 4.8M-entry workloads; the 1.5M one is reported as INFO). Times are
the best of ``--repeat`` runs, on plans whose ranks share item objects as in
:mod:`dcplan.workloads` (see the README's caveats).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from typing import Any

TARGET_VERIFY_SHARE = 0.10
WORKLOADS = (("hsdp8", "70b", 512), ("ddp", "7b", 4096), ("hsdp8", "8b", 4096))
STRATEGIES = ("size_balanced", "split")


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(wl: Any, repeat: int, profile: str | None = None) -> dict[str, dict[str, float]]:
    import dcplan
    from dcplan import compat
    from dcplan.gcpause import paused_gc
    from dcplan.save import verify
    from dcplan.save.index import index_plans
    from dcplan.save.local import plan_digest
    from dcplan.save.planner import RankPayload

    plans = [compat.replace_plan(p, planner_data={}) for p in wl.plans]
    digests = [plan_digest(p.items) for p in plans]
    out: dict[str, dict[str, float]] = {}
    for name in STRATEGIES:
        planner = dcplan.SavePlanner(strategy=name, report=False)
        sent = [
            compat.replace_plan(p, planner_data=RankPayload(mapping={}, agreement=planner.agreement(), digest=d))
            for p, d in zip(plans, digests)
        ]
        step = _best(lambda planner=planner, sent=sent: planner.create_global_plan(sent), repeat)
        idx = index_plans(plans, digests)
        strategy = dcplan.get_plugin_manager().get_strategy(name)
        deduped = strategy.run(plans, strategy.resolve_options({}), idx)

        def checks(deduped: Any = deduped, name: str = name, idx: Any = idx) -> None:
            with paused_gc():  # as in the coordinator step
                verify.check_consistency(idx, plans)
                verify.verify_dedup(idx, deduped, name)

        if profile == name:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(checks)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        secs = _best(checks, repeat)
        out[name] = {"step": step, "verify": secs, "share": secs / step, "written": sum(len(p.items) for p in deduped)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default=None, metavar="TEXT", help="only workloads whose name contains TEXT")
    parser.add_argument("--profile", default=None, choices=STRATEGIES, help="cProfile the checks for one strategy")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from dcplan import workloads

    print(f"# verification share (torch {torch.__version__}, python {sys.version.split()[0]}, best of {args.repeat})\n")
    print("| workload | entries | strategy | items written | coordinator step | verification | share |")
    print("|---|---:|---|---:|---:|---:|---:|")
    worst: dict[tuple[str, bool], tuple[float, str]] = {}  # (strategy, 2M+ entries) -> worst share
    for layout, model, world in WORKLOADS:
        name = f"{model} {layout} x{world}"
        if args.only and args.only not in name:
            continue
        wl = workloads.make(layout, model, world)
        for strat, r in bench(wl, args.repeat, args.profile).items():
            print(f"| {name} | {wl.entries:,} | {strat} | {r['written']:,} | {r['step']:.3f} s | {r['verify']:.3f} s | "
                  f"{r['share']:.1%} |", flush=True)
            at = (strat, wl.entries >= 2_000_000)
            worst[at] = max(worst.get(at, (0.0, "")), (r["share"], name))
        del wl
        gc.collect()
    print()
    for (strat, big), (share, name) in sorted(worst.items(), key=lambda t: (not t[0][1], t[0][0])):
        verdict = ("PASS" if share <= TARGET_VERIFY_SHARE else "MISS") if big else "INFO"
        print(f"- {verdict}: {strat} verification <= {TARGET_VERIFY_SHARE:.0%} of the coordinator step "
              f"{'at 2M+' if big else 'below 2M'} plan entries (worst {share:.1%} on {name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
