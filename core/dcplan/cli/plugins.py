"""``dcplan plugins [--json] [--traceback]`` and ``dcplan plugins info NAME``.

Lists the loaded plugins (hooks, strategies with options and defaults as TOML,
commands), the installed plugins that selection left out (disabled by
``DCPLAN_DISABLE_PLUGINS``, or not in ``DCPLAN_LOAD_PLUGINS``) and the failed ones
with a one-line reason; ``--traceback`` adds the full traceback.
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

from dcplan.config import toml_value
from dcplan.errors import DcplanError

__all__ = ["run_plugins", "describe_plugins"]


def _strategy(reg: Any) -> dict[str, Any]:
    s = reg.strategy
    return {"name": s.name, "plugin": reg.plugin, "distribution": reg.distribution,
            "description": s.description, "options": dict(s.options)}


def describe_plugins(pm: Any, *, commands: dict[str, str], traceback: bool = False) -> dict[str, Any]:
    """Everything ``dcplan plugins --json`` prints, as JSON-able data.

    :param commands: each ``dcplan`` command and the distribution that adds it.
    """
    from dcplan.manager import _norm

    strategies = pm.strategies
    loaded = []
    for i in pm.plugin_infos():
        mine = sorted(c for c, dist in commands.items() if _norm(dist) == _norm(i.distribution or i.name))
        plugin = pm.pm.get_plugin(i.name)
        doc = (getattr(plugin, "__doc__", None) or "").strip()
        loaded.append({
            "name": i.name, "distribution": i.distribution, "version": i.version, "builtin": i.builtin,
            "module": getattr(plugin, "__file__", None), "summary": doc.splitlines()[0] if doc else "",
            "origin": pm.origin(i.name), "hooks": list(i.hooks), "strategies": list(i.strategies),
            "commands": mine if (i.builtin or _norm(i.distribution or "") != "dcplan") else [],
            "load_strategies": [_strategy(pm.load_strategies[n]) for n in i.load_strategies],
        })
    return {
        "plugins": loaded,
        "strategies": {n: _strategy(r) for n, r in strategies.items()},
        "load_strategies": {n: _strategy(r) for n, r in pm.load_strategies.items()},
        "skipped": [{"entry_point": s.entry_point, "distribution": s.distribution, "version": s.version,
                     "reason": s.reason} for s in pm.skipped_plugins],
        "failed": [_failed(f, traceback) for f in pm.failed],
        "commands": commands,
    }


def _failed(f: Any, traceback: bool) -> dict[str, Any]:
    return {"entry_point": f.entry_point, "distribution": f.distribution, "hook": f.hook, "error": f.error,
            **({"traceback": f.traceback} if traceback else {})}


def _collect(traceback: bool) -> dict[str, Any]:
    from dcplan.cli.main import build_parser_and_owners, cli_plugin_manager
    from dcplan.manager import get_plugin_manager

    with warnings.catch_warnings():  # the listing shows failures itself
        warnings.simplefilter("ignore")
        pm = get_plugin_manager()
        _ = pm.strategies
        cli_pm = cli_plugin_manager()
    _, owners = build_parser_and_owners(cli_pm)
    dists = {name: dist or name for name, (dist, _v) in cli_pm._dist.items()}
    data = describe_plugins(pm, commands={c: dists.get(o, o) for c, o in owners.items()}, traceback=traceback)
    known = {(f["entry_point"], f["distribution"]) for f in data["failed"]}
    data["failed"] += [_failed(f, traceback) for f in cli_pm.failed if (f.entry_point, f.distribution) not in known]
    return data


def _options_line(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {toml_value(v)}" for k, v in sorted(options.items())) or "(none)"


def _print_plugin(p: dict[str, Any], strategies: dict[str, Any], full: bool) -> None:
    tag = " (built-in)" if p["builtin"] else ""
    print(f"{p['distribution'] or p['name']} {p['version'] or ''}".rstrip() + tag)
    print(f"  plugin: {p['name']}" + (f" ({p['origin']})" if full else ""))
    if full:
        if p["summary"]:
            print(f"  about: {p['summary']}")
        if p["module"]:
            print(f"  module: {p['module']}")
    print(f"  hooks: {', '.join(h.removeprefix('dcplan_') for h in p['hooks']) or '-'}")
    for s in p["strategies"]:
        print(f"  strategy: {s} - {strategies[s]['description']}")
        print(f"    options: {_options_line(strategies[s]['options'])}")
    for ls in p.get("load_strategies", ()):
        print(f"  load strategy: {ls['name']} - {ls['description']}")
        print(f"    options: {_options_line(ls['options'])}")
    if p["commands"]:
        print(f"  commands: {', '.join(p['commands'])}")


def _print_failed(f: dict[str, Any]) -> None:
    where = f"failed in hook {f['hook']}" if f["hook"] else "failed to load"
    print(f"FAILED {f['distribution']} ({f['entry_point']}): {where}: {f['error']}")
    if "traceback" in f:
        print("  " + f["traceback"].rstrip().replace("\n", "\n  "))


def _print_all(data: dict[str, Any], traceback: bool) -> None:
    for p in data["plugins"]:
        _print_plugin(p, data["strategies"], full=False)
    for s in data["skipped"]:
        print(f"DISABLED {s['distribution']} {s['version'] or ''} ({s['entry_point']}): {s['reason']}")
    for f in data["failed"]:
        _print_failed(f)
    if data["failed"] and not traceback:
        print("(dcplan plugins --traceback shows where each failure happened)")


def _find(data: dict[str, Any], name: str) -> dict[str, Any]:
    import difflib

    from dcplan.manager import _norm

    want = _norm(name)
    for p in data["plugins"]:
        if want in {_norm(p["name"]), _norm(p["distribution"] or "")} or name in p["strategies"] \
                or name in p["commands"]:
            return {"status": "loaded", **p}
    for key, status in (("skipped", "disabled"), ("failed", "failed")):
        for s in data[key]:
            if want in {_norm(s["entry_point"]), _norm(s["distribution"])}:
                return {"status": status, **s}
    names = sorted({p["name"] for p in data["plugins"]} | {p["distribution"] or "" for p in data["plugins"]}
                   | set(data["strategies"]) | {s["distribution"] for s in data["skipped"] + data["failed"]})
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(n for n in names if n)}"
    raise DcplanError(f"no dcplan plugin, distribution or strategy is named {name!r}{hint}")


def _print_info(p: dict[str, Any], strategies: dict[str, Any]) -> None:
    if p["status"] == "loaded":
        _print_plugin(p, strategies, full=True)
        return
    print(f"{p['distribution']} ({p['entry_point']}): {p['status'].upper()}")
    if p["status"] == "disabled":
        print(f"  {p['reason']}")
    else:
        _print_failed(p)


def run_plugins(args: argparse.Namespace) -> int:
    data = _collect(args.traceback)
    if getattr(args, "plugins_command", None) == "info":
        found = _find(data, args.name)
        if args.json:
            print(json.dumps(found, indent=2, default=str))
        else:
            _print_info(found, data["strategies"])
        return 0
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        _print_all(data, args.traceback)
    return 0
