"""``dcplan plan``: the plan report of synthetic workloads, without processes.

Builds the local plans a layout produces (:mod:`dcplan.workloads`), runs
torch's ``dedup_save_plans`` (both modes) and every registered dcplan strategy
on them, and prints one row per strategy (busiest rank vs the lower bound) and
the per-rank bytes of the chosen strategy (``--strategy``; default: the config's,
or the first ``--only`` strategy). A progress bar shows on a terminal::

    dcplan plan --layout ddp --model 70b --ranks 64
    dcplan plan --layout tp8pp8dp64 --model 70b --plot bytes.png
    dcplan plan --layout hsdp8 --model 7b --ranks 512 --strategy split --json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["register", "run_plan", "strategy_runs"]


def strategy_runs(
    names: Sequence[str] | None = None,
    index: Any = None,
) -> list[tuple[str, Callable[[Sequence[Any]], list[Any]]]]:
    """``(row name, dedup function)`` for torch's two modes and every (or the named) registered strategy.

    ``size_balanced`` also gets a ``size_balanced[mode=torch]`` row, and with an
    ``index`` that knows hosts, a ``size_balanced[balance=node]`` row. Strategy
    functions that accept ``index=`` get ``index``.
    """
    import inspect

    from dcplan import compat
    from dcplan.manager import get_plugin_manager

    pm = get_plugin_manager()

    def torch_default(plans: Sequence[Any]) -> list[Any]:
        return compat.torch_dedup_save_plans(plans)

    def torch_lowest(plans: Sequence[Any]) -> list[Any]:
        return compat.torch_dedup_save_plans(plans, save_to_lowest_rank=True)

    def registered(strat: Any, **options: Any) -> Callable[[Sequence[Any]], list[Any]]:
        takes_index = index is not None and "index" in inspect.signature(strat.func).parameters

        def run(plans: Sequence[Any]) -> list[Any]:
            if takes_index:
                return list(strat.func(plans, index=index, **strat.resolve_options(options)))
            return list(strat(plans, **options))

        return run

    runs: list[tuple[str, Callable[[Sequence[Any]], list[Any]]]] = [
        ("torch dedup_save_plans", torch_default),
        ("torch save_to_lowest_rank", torch_lowest),
    ]
    for name in names if names is not None else pm.strategy_names():
        strat = pm.get_strategy(name)
        runs.append((name, registered(strat)))
        if name == "size_balanced" and strat.options.get("mode") == "balanced":
            runs.append((f"{name}[mode=torch]", registered(strat, mode="torch")))
            if index is not None and getattr(index, "hosts", None) is not None:
                runs.append((f"{name}[balance=node]", registered(strat, balance="node")))
    return runs


def run_plan(
    layout: str,
    model: str,
    ranks: int | None,
    *,
    adam: bool = True,
    strategies: Sequence[str] | None = None,
    progress: Any = None,
    ranks_per_node: int | None = None,
) -> tuple[Any, dict[str, Any], dict[str, float], dict[str, str]]:
    """Build the workload and report every strategy on it.

    :param progress: ``progress(iterable, desc, total=...)`` wrapping the strategy runs
        (:func:`dcplan.cli.progress.progress`), or ``None``.
    :param ranks_per_node: consecutive ranks share a host (node ``r // N``): the
        reports add bytes per node, and ``size_balanced[balance=node]`` runs.

    :returns: ``(workload, reports by row name, seconds by row name, errors by row name)``.
    """
    from dcplan import workloads
    from dcplan.save.index import index_plans
    from dcplan.save.report import build_report

    wl = workloads.make(layout, model, ranks, adam=adam)
    hosts = [f"node{r // ranks_per_node}" for r in range(wl.world_size)] if ranks_per_node else None
    idx = index_plans(wl.plans, hosts=hosts)
    reports: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    errors: dict[str, str] = {}
    runs = strategy_runs(strategies, index=idx if hosts else None)
    for name, fn in progress(runs, "strategies", total=len(runs), unit="strategy") if progress else runs:
        t0 = time.perf_counter()
        try:
            out = fn(wl.plans)
        except Exception as exc:  # noqa: BLE001 - one broken strategy must not hide the others
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        seconds[name] = time.perf_counter() - t0
        reports[name] = build_report(wl.plans, out, name, index=idx)
    return wl, reports, seconds, errors


def plot_reports(reports: dict[str, Any], path: str, title: str) -> None:
    """Bar charts of bytes per rank, one panel per report, with the lower bound as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from dcplan.errors import DcplanError

        raise DcplanError(
            "dcplan plan --plot needs matplotlib, which is not installed; install the optional extra: "
            "pip install 'dcplan[plot]'"
        ) from None
    n = len(reports)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n + 0.6), sharex=True, squeeze=False)
    for ax, (name, rep) in zip(axes[:, 0], reports.items()):
        ranks = list(range(len(rep.bytes_per_rank)))
        gib = [b / 2**30 for b in rep.bytes_per_rank]
        ax.bar(ranks, gib, width=1.0, color="tab:blue" if rep.ratio <= 1.08 else "tab:red", linewidth=0)
        ax.axhline(rep.lower_bound / 2**30, color="black", linestyle="--", linewidth=1, label="lower bound")
        ax.set_ylabel("GiB")
        ax.set_title(f"{name}: busiest / lower bound = {rep.ratio:.3f}", fontsize=9, loc="left")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("rank")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, in words, or ``None``."""
    from dcplan import workloads

    try:
        kind, _ = workloads.parse(args.layout)
    except ValueError as exc:
        return str(exc)
    if kind in ("ddp", "fsdp", "hsdp") and args.ranks is None:
        return f"layout {args.layout!r} needs --ranks N (e.g. --ranks 64)"
    if args.model.lower() not in workloads.MODELS:
        return f"unknown --model {args.model!r}; choose one of: {', '.join(workloads.MODELS)}"
    if args.per_rank and not args.json:
        return "--per-rank adds per-rank lists to the JSON output; use it with --json"
    return None


def _shown_strategy(args: argparse.Namespace) -> str:
    """--strategy; else the config's strategy if it runs; else the first --only."""
    from dcplan.config import resolve_config
    from dcplan.manager import get_plugin_manager

    if args.strategy:
        return str(args.strategy)
    cfg, where = resolve_config()
    configured = get_plugin_manager().resolve_strategy(cfg.strategy, explicit=where["strategy"] != "default").name
    if args.only and configured not in args.only:
        return str(args.only[0])
    return configured


def _print_text(args: argparse.Namespace, wl: Any, reports: dict[str, Any], errors: dict[str, str],
                shown: str) -> None:
    from dcplan.fmt import fmt_bytes
    from dcplan.save.report import compare_table

    any_rep = next(iter(reports.values()))
    print(
        f"workload: {wl.name}: {wl.world_size} ranks, {wl.entries:,} plan entries, "
        f"{fmt_bytes(any_rep.total_bytes)} to write; lower bound {fmt_bytes(any_rep.lower_bound)} "
        f"({any_rep.bound_reason})"
    )
    print()
    print(compare_table(reports))
    if args.ranks_per_node:
        print()
        print(f"{'strategy':<28} {'busiest node':>13} {'bytes':>11} {'node bound':>11} {'ratio':>7}")
        for name, r in reports.items():
            print(f"{name:<28} {r.node_names[r.busiest_node]:>13} {fmt_bytes(r.busiest_node_bytes):>11} "
                  f"{fmt_bytes(r.node_lower_bound):>11} {r.node_ratio:>7.3f}")
    for name, err in errors.items():
        print(f"{name:<28} error: {err}")
    print()
    print(f"bytes per rank with {shown}:")
    print(reports[shown].table(max_rows=args.max_rows))
    if args.plot:
        print(f"\nplot written to {args.plot}")


def _cmd_plan(args: argparse.Namespace) -> int:
    from dcplan.cli.progress import progress
    from dcplan.cli.text import usage_error

    problem = _check_args(args)
    if problem is not None:
        return usage_error(args, problem)
    shown = _shown_strategy(args)
    only = args.only if args.only is None or shown in args.only else [*args.only, shown]
    try:
        wl, reports, seconds, errors = run_plan(
            args.layout, args.model.lower(), args.ranks, adam=not args.no_adam, strategies=only, progress=progress,
            ranks_per_node=args.ranks_per_node,
        )
    except ValueError as exc:
        return usage_error(args, str(exc))
    if shown not in reports:
        why = f": {errors[shown]}" if shown in errors else ""
        return usage_error(args, f"strategy {shown!r} was not run{why}; choose one of: {', '.join(reports)}")
    if args.plot:
        keep = {k: v for k, v in reports.items() if k in ("torch dedup_save_plans", shown, "split")}
        plot_reports(keep, args.plot, wl.name)
    if args.json:
        out = {
            "workload": wl.name,
            "world_size": wl.world_size,
            "entries": wl.entries,
            "strategies": {k: {**r.to_dict(), "seconds": seconds[k]} for k, r in reports.items()},
            "errors": errors,
        }
        if not args.per_rank:
            for v in out["strategies"].values():
                v.pop("bytes_per_rank")
                v.pop("items_per_rank")
        print(json.dumps(out, indent=2))
        return 0
    _print_text(args, wl, reports, errors, shown)
    return 0


def register(subparsers: Any) -> None:
    """Add ``dcplan plan`` to the CLI (from :mod:`dcplan.cli.commands`)."""
    from dcplan.cli.text import plain

    p = subparsers.add_parser(
        "plan",
        help="plan report of synthetic workloads (DDP, FSDP, HSDP, TPxPPxDP) for every strategy, no processes",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--layout", default="ddp", help="ddp, fsdp, hsdp[N] (shard group N, default 8) or tp<T>pp<P>dp<D>")
    p.add_argument("--model", default="7b", help="model size: tiny, 125m, 1b, 7b, 8b, 13b, 70b (default 7b)")
    p.add_argument("-n", "--ranks", type=int, default=None, help="rank count (ddp/fsdp/hsdp)")
    p.add_argument("--no-adam", action="store_true", help="parameters only, no Adam states")
    p.add_argument("--strategy", default=None, help="strategy whose per-rank bytes are shown (default: config's)")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="run only this registered strategy (repeatable; torch's two modes always run)")
    p.add_argument("--ranks-per-node", type=int, default=None, metavar="N",
                   help="ranks r..r+N-1 share a node: adds bytes per node and size_balanced[balance=node]")
    p.add_argument("--max-rows", type=int, default=32, help="per-rank rows shown (busiest and idlest beyond it)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart of bytes per rank (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--per-rank", action="store_true", help="with --json: include bytes/items per rank")
    p.set_defaults(func=_cmd_plan)
