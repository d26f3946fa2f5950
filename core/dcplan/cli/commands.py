"""dcplan's own subcommands, registered through ``dcplan_register_commands`` like a plugin's.

``plugins``, ``config``, ``demo``, ``plan`` and ``inspect``; each command imports what
it needs (torch included) only when it runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dcplan.cli.text import plain
from dcplan.manager import hookimpl

__all__ = ["dcplan_register_commands"]


def _cmd_config(args: argparse.Namespace) -> int:
    from dcplan.config import resolve_config
    from dcplan.errors import ConfigError
    from dcplan.manager import get_plugin_manager

    cfg, where = resolve_config()
    pm = get_plugin_manager()
    try:  # the strategy and its options are checked here, not only when a save fails
        strategy = pm.resolve_strategy(cfg.strategy, explicit=where["strategy"] != "default")
        strategy.resolve_options(cfg.strategy_options)
    except ValueError as exc:
        raise ConfigError(f"{exc} (strategy from {where['strategy']}, options from {where['strategy_options']})") from None
    data = cfg.to_dict()
    if args.json:
        print(json.dumps({k: {"value": v, "source": where[k]} for k, v in data.items()}, indent=2, default=str))
        return 0
    width = max(map(len, data))
    for k, v in data.items():
        print(f"{k:<{width}} = {json.dumps(v, default=str):<24} # {where[k]}")
    if strategy.name != cfg.strategy:
        print(f"# strategy {cfg.strategy!r} is not installed: saves use {strategy.name!r}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dcplan.cli.demo import run_demo

    return run_demo(world_size=args.world_size, strategy=args.strategy, workdir=args.dir)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from dcplan.cli.plugins import run_plugins

    return run_plugins(args)


def _add_plugins(sub: Any) -> None:
    p = sub.add_parser(
        "plugins",
        help="list plugins (loaded, disabled, failed), their hooks, strategies and options",
        description="List dcplan's plugins: loaded, disabled or left out by selection, and failed, each with "
                    "its reason, and every strategy with its options and defaults (as TOML).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of failed plugins")
    p.set_defaults(func=_cmd_plugins, name=None)
    inner = p.add_subparsers(dest="plugins_command", metavar="info")
    info = inner.add_parser("info", help="one plugin in full (by plugin, distribution or strategy name)",
                            description="Show one plugin in full: by entry-point, distribution or strategy name.")
    info.add_argument("name", help="a plugin, distribution or strategy name (dcplan-lowest-rank, lowest_rank)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--traceback", action="store_true", help="show the full traceback if it failed")
    info.set_defaults(func=_cmd_plugins, _parser=info)


@hookimpl
def dcplan_register_commands(subparsers: Any) -> None:
    from dcplan.cli import inspect, plan, verify

    _add_plugins(subparsers)

    p = subparsers.add_parser("config", help="show the resolved config and where each value came from",
                              description="Show every config key, its value and where it came from; the "
                                          "strategy and its options are checked against the installed plugins.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_config)

    p = subparsers.add_parser("demo", help="save, reload and verify a model with real gloo processes",
                              description=plain(_demo_doc()))
    p.add_argument("-n", "--world-size", type=int, default=4)
    p.add_argument("--strategy", default=None, help="strategy to show (default: from config)")
    p.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    p.set_defaults(func=_cmd_demo)

    plan.register(subparsers)
    inspect.register(subparsers)
    verify.register(subparsers)


def _demo_doc() -> str:
    return ("Spawn gloo processes on the CPU, save a small model with every installed strategy and with torch's "
            "DefaultSavePlanner, print the bytes each rank wrote, then reload every checkpoint and check it "
            "bit-exact.")

