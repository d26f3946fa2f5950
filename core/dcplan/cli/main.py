"""The ``dcplan`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_plugins(args: argparse.Namespace) -> int:
    from dcplan.manager import get_plugin_manager

    pm = get_plugin_manager()
    infos = pm.plugin_infos()
    strategies = pm.strategies
    if args.json:
        out = {
            "plugins": [
                {
                    "name": i.name,
                    "distribution": i.distribution,
                    "version": i.version,
                    "builtin": i.builtin,
                    "hooks": list(i.hooks),
                    "strategies": list(i.strategies),
                }
                for i in infos
            ],
            "strategies": {n: {"distribution": r.distribution, "description": r.strategy.description,
                               "options": r.strategy.options} for n, r in strategies.items()},
            "failed": [{"entry_point": f.entry_point, "distribution": f.distribution, "error": f.error}
                       for f in pm.failed],
        }
        print(json.dumps(out, indent=2, default=str))
        return 0
    for i in infos:
        tag = " (built-in)" if i.builtin else ""
        print(f"{i.distribution or i.name} {i.version or ''}{tag}".rstrip())
        print(f"  plugin: {i.name}")
        print(f"  hooks: {', '.join(h.removeprefix('dcplan_') for h in i.hooks) or '-'}")
        if i.strategies:
            for s in i.strategies:
                print(f"  strategy: {s} - {strategies[s].strategy.description}")
    for f in pm.failed:
        print(f"FAILED {f.distribution} ({f.entry_point}): {f.error}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from dcplan.config import resolve_config

    cfg, where = resolve_config()
    data = cfg.to_dict()
    if args.json:
        print(json.dumps({k: {"value": v, "source": where[k]} for k, v in data.items()}, indent=2, default=str))
        return 0
    width = max(map(len, data))
    for k, v in data.items():
        print(f"{k:<{width}} = {json.dumps(v, default=str):<24} # {where[k]}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dcplan.cli.demo import run_demo

    return run_demo(world_size=args.world_size, strategy=args.strategy, workdir=args.dir)


COMMANDS: dict[str, str] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcplan", description="Pluggable planning for torch.distributed.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins, their hooks and strategies")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("config", help="show the resolved config and where each value came from")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("demo", help="save, reload and verify a model with real gloo processes")
    p.add_argument("-n", "--world-size", type=int, default=4)
    p.add_argument("--strategy", default=None, help="strategy to show (default: from config)")
    p.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    p.set_defaults(func=_cmd_demo)

    # Further commands live in their own modules: dcplan.cli_<name>.register(sub)
    import importlib

    for name in ("plan", "inspect", "convert"):
        try:
            mod = importlib.import_module(f"dcplan.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dcplan.cli.{name}":
                raise
            continue
        mod.register(sub)

    # storage (issue 14): dcplan verify, registered like plan/inspect above
    from dcplan.cli import verify as _verify_cmd

    _verify_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dcplan.errors import DcplanError

    try:
        return int(args.func(args) or 0)
    except DcplanError as exc:
        print(f"dcplan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
