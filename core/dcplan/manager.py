"""The plugin manager: entry-point discovery, selection, isolation, strategies.

Plugins come from the ``dcplan`` entry-point group. Discovery is deterministic
(sorted by distribution name, then entry-point name) and isolated: a plugin that
fails to import, or whose registration hook raises, becomes a warning that names
the plugin, its distribution and the error, attributed to the plugin's own file
(``DCPLAN_STRICT_PLUGINS=1`` turns it into an error) and the others still load.

Selection by environment, each a comma-separated list of distribution names
(``dcplan-lowest-rank``) or entry-point names (``lowest_rank``):

* ``DCPLAN_LOAD_PLUGINS``: allow list; only these load (empty string: none).
* ``DCPLAN_DISABLE_PLUGINS``: deny list; these never load.
* ``DCPLAN_PLUGINS``: modules imported and registered as plugins without an entry
  point (one-off, local plugins, like ``pytest -p``): ``DCPLAN_PLUGINS=my_strategy``.

A name in the allow or deny list that matches no installed plugin is warned
about. Two distributions with the same entry-point name are an error naming both.

dcplan's own defaults live in :mod:`dcplan.builtin` and are registered through
the same hooks, before any entry point.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import importlib.util
import os
import threading
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import pluggy

from dcplan import hookspecs
from dcplan.config import parse_bool, parse_name_list
from dcplan.errors import PluginError, PluginWarning, UnknownStrategyError
from dcplan.types import LoadStrategy, PluginInfo, Strategy

__all__ = [
    "ENTRY_POINT_GROUP",
    "CLI_ENTRY_POINT_GROUP",
    "DEFAULT_STRATEGY",
    "FALLBACK_STRATEGY",
    "DcplanPluginManager",
    "FailedPlugin",
    "SkippedPlugin",
    "PluginWarning",
    "get_plugin_manager",
    "reset_plugin_manager",
    "hookimpl",
]

ENTRY_POINT_GROUP = "dcplan"
#: Entry points of modules that only add ``dcplan`` subcommands (light to import).
CLI_ENTRY_POINT_GROUP = "dcplan.cli"
BUILTIN_PLUGINS: tuple[str, ...] = ("dcplan.builtin",)
#: Config's default strategy, and what it falls back to when its plugin is not installed.
DEFAULT_STRATEGY = "size_balanced"
FALLBACK_STRATEGY = "torch"
DEFAULT_STRATEGY_DIST = "dcplan-size-balanced"

#: Marker for hook implementations: ``@dcplan.hookimpl``.
hookimpl = pluggy.HookimplMarker("dcplan")

_REGISTRATION_HOOKS = ("dcplan_register_strategies",)


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


def _env_list(env: Mapping[str, str], key: str) -> list[str] | None:
    if key not in env:
        return None
    return [_norm(p) for p in parse_name_list(env[key])]


@attrs.frozen
class FailedPlugin:
    """A plugin that could not be loaded, or whose registration hook raised."""

    entry_point: str
    distribution: str
    error: str
    hook: str | None = None
    traceback: str = ""

    def reason(self) -> str:
        where = f"failed in hook {self.hook}" if self.hook else "failed to load"
        return f"plugin {self.entry_point!r} (distribution {self.distribution}) {where}: {self.error}"


@attrs.frozen
class SkippedPlugin:
    """An installed plugin that selection left out (``reason`` says which variable)."""

    entry_point: str
    distribution: str
    version: str | None
    reason: str


@attrs.frozen
class _Registered:
    strategy: Strategy
    plugin: str
    distribution: str


@attrs.frozen
class _RegisteredLoad:
    strategy: LoadStrategy
    plugin: str
    distribution: str


@attrs.frozen
class _Found:
    ep: md.EntryPoint
    dist: str
    version: str | None


def _plugin_location(module: str | None, exc: BaseException | None = None) -> tuple[str, int]:
    """A file and line in the plugin itself, for ``warnings.warn_explicit``."""
    origin = None
    if module:
        try:
            spec = importlib.util.find_spec(module.split(".")[0])
            origin = spec.origin if spec is not None else None
        except (ImportError, ValueError):
            origin = None
    root = os.path.dirname(origin) if origin and origin.endswith("__init__.py") else origin
    if exc is not None and root:
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename.startswith(root):
                return frame.filename, frame.lineno or 1
    return origin or (module or "<plugin>"), 1


def _warn_plugin(message: str, module: str | None, exc: BaseException | None = None) -> None:
    filename, lineno = _plugin_location(module, exc)
    warnings.warn_explicit(message, PluginWarning, filename, lineno, module=module or "dcplan.plugin")


class DcplanPluginManager:
    """Wraps a :class:`pluggy.PluginManager` with dcplan's policies.

    :param env: the environment to read the selection variables from (default ``os.environ``).
    :param entry_points: load installed plugins (``False``: built-ins and ``extra_plugins`` only).
    :param extra_plugins: ``(name, plugin)`` pairs registered after the entry points (tests).
    :param group: the entry-point group (``dcplan``; the CLI uses ``dcplan.cli``).
    :param builtins: modules registered first, as dcplan's own plugins.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        entry_points: bool = True,
        extra_plugins: Iterable[tuple[str, Any]] = (),
        group: str = ENTRY_POINT_GROUP,
        builtins: Sequence[str] = BUILTIN_PLUGINS,
    ) -> None:
        env = os.environ if env is None else env
        self.group = group
        self.pm = pluggy.PluginManager("dcplan")
        self.pm.add_hookspecs(hookspecs)
        self.failed: list[FailedPlugin] = []
        #: distribution names of installed plugins that selection left out (see :attr:`skipped_plugins`)
        self.skipped: list[str] = []
        self.skipped_plugins: list[SkippedPlugin] = []
        self._dist: dict[str, tuple[str | None, str | None]] = {}
        self._builtin: set[str] = set()
        self._origin: dict[str, str] = {}
        self.strict = parse_bool(env.get("DCPLAN_STRICT_PLUGINS", ""), "DCPLAN_STRICT_PLUGINS")
        self.allow = _env_list(env, "DCPLAN_LOAD_PLUGINS")
        self.deny = _env_list(env, "DCPLAN_DISABLE_PLUGINS") or []
        self.local = parse_name_list(env.get("DCPLAN_PLUGINS", "")) if group == ENTRY_POINT_GROUP else []

        for modname in builtins:
            module = importlib.import_module(modname)
            self.pm.register(module, name=modname)
            self._dist[modname] = ("dcplan", _version("dcplan"))
            self._builtin.add(modname)
            self._origin[modname] = "built-in"
        if entry_points:
            self._load_entry_points()
        self._load_local_modules()
        for name, plugin in extra_plugins:
            self.register(plugin, name=name)
        self.pm.check_pending()
        self._strategies: dict[str, _Registered] | None = None
        self._load_strategies: dict[str, _RegisteredLoad] | None = None

    # -- discovery -----------------------------------------------------
    def _skip_reason(self, ep_name: str, dist_name: str) -> str | None:
        names = {_norm(ep_name), _norm(dist_name)}
        if names & set(self.deny):
            return "disabled by DCPLAN_DISABLE_PLUGINS"
        if self.allow is not None and not names & set(self.allow):
            return "not in DCPLAN_LOAD_PLUGINS"
        return None

    def _discover(self) -> list[_Found]:
        """Every entry point of the group, sorted; a name two distributions claim is an error."""
        found: list[tuple[str, str, _Found]] = []
        for dist in md.distributions():
            try:  # a half-installed distribution must not break discovery of the others
                dist_name = str(dist.metadata["Name"] or "?")
                eps = [ep for ep in dist.entry_points if ep.group == self.group]
                version = dist.version
            except Exception:  # noqa: BLE001
                continue
            for ep in eps:
                found.append((_norm(dist_name), ep.name, _Found(ep, dist_name, version)))
        out: list[_Found] = []
        owner: dict[str, str] = {}
        for _, _, f in sorted(found, key=lambda t: (t[0], t[1])):
            other = owner.get(f.ep.name)
            if other is not None and _norm(other) == _norm(f.dist):
                continue  # the same distribution on sys.path twice
            if other is not None and self._skip_reason(f.ep.name, f.dist) is None:
                first = next(o for o in out if o.ep.name == f.ep.name)
                if self._skip_reason(first.ep.name, first.dist) is None:
                    raise PluginError(
                        f"two distributions provide the dcplan plugin {f.ep.name!r}: {other} and {f.dist}; "
                        f"uninstall one, or disable one by its distribution name "
                        f"(DCPLAN_DISABLE_PLUGINS={f.dist})"
                    )
            owner.setdefault(f.ep.name, f.dist)
            out.append(f)
        return out

    def _load_entry_points(self) -> None:
        found = self._discover()
        self._warn_unmatched(found)
        for f in found:
            reason = self._skip_reason(f.ep.name, f.dist)
            if reason is not None:
                self.skipped.append(f.dist)
                self.skipped_plugins.append(SkippedPlugin(f.ep.name, f.dist, f.version, reason))
                continue
            try:
                plugin = f.ep.load()
                self.pm.register(plugin, name=f.ep.name)
            except Exception as exc:  # noqa: BLE001 - isolation is the point
                self._fail(FailedPlugin(f.ep.name, f.dist, f"{type(exc).__name__}: {exc}",
                                        traceback="".join(traceback.format_exception(exc))),
                           f.ep.module, exc)
                continue
            self._dist[f.ep.name] = (f.dist, f.version)
            self._origin[f.ep.name] = f"entry point {f.ep.name} = {f.ep.value}"

    def _load_local_modules(self) -> None:
        """``DCPLAN_PLUGINS=mod1,mod2``: import these modules and register them as plugins."""
        for modname in self.local:
            try:
                module = importlib.import_module(modname)
                self.pm.register(module, name=modname)
            except Exception as exc:  # noqa: BLE001 - isolation, as for entry points
                self._fail(FailedPlugin(modname, "(DCPLAN_PLUGINS)", f"{type(exc).__name__}: {exc}",
                                        traceback="".join(traceback.format_exception(exc))),
                           modname, exc)
                continue
            self._dist[modname] = (f"{modname} (DCPLAN_PLUGINS)", None)
            self._origin[modname] = "DCPLAN_PLUGINS"

    def _warn_unmatched(self, found: Sequence[_Found]) -> None:
        if self.group != ENTRY_POINT_GROUP:  # the CLI's manager: the main one warns, once
            return
        shown = {_norm(f.ep.name): f.ep.name for f in found} | {_norm(f.dist): f.dist for f in found}
        known = set(shown) | _cli_plugin_names()
        for var, names in (("DCPLAN_LOAD_PLUGINS", self.allow or []), ("DCPLAN_DISABLE_PLUGINS", self.deny)):
            for name in names:
                if name in known:
                    continue
                close = difflib.get_close_matches(name, sorted(shown), n=1)
                hint = f"; did you mean {shown[close[0]]!r}?" if close else ""
                warnings.warn(
                    f"{var} names {name!r}, which matches no installed dcplan plugin{hint} "
                    f"(installed: {', '.join(sorted({f.dist for f in found})) or 'none'})",
                    PluginWarning,
                    stacklevel=4,
                )

    def _fail(self, fail: FailedPlugin, module: str | None, exc: BaseException) -> None:
        self.failed.append(fail)
        if self.strict:
            raise PluginError(
                f"dcplan {fail.reason()} (DCPLAN_STRICT_PLUGINS is set; unset it to skip broken plugins "
                "with a warning)"
            ) from exc
        _warn_plugin(f"dcplan {fail.reason()}; it is skipped", module, exc)

    def register(self, plugin: Any, name: str, distribution: str | None = None) -> None:
        """Register an in-process plugin (tests, notebooks)."""
        self.pm.register(plugin, name=name)
        self._dist[name] = (distribution or name, None)
        self._origin[name] = "registered in-process"
        self._strategies = None
        self._load_strategies = None

    # -- strategies ----------------------------------------------------
    @property
    def strategies(self) -> dict[str, _Registered]:
        if self._strategies is None:
            self._strategies = self._collect_strategies()
        return self._strategies

    def _call_registration(self, impl: Any, hook: str) -> Any:
        pname = impl.plugin_name
        dist = self._dist.get(pname, (pname, None))[0] or pname
        try:
            return impl.function()
        except Exception as exc:  # noqa: BLE001 - name the plugin, keep the others
            fail = FailedPlugin(pname, dist, f"{type(exc).__name__}: {exc}", hook=hook,
                                traceback="".join(traceback.format_exception(exc)))
            self._fail(fail, getattr(impl.plugin, "__name__", None), exc)
            return None

    def _collect_strategies(self) -> dict[str, _Registered]:
        return self._collect_records("dcplan_register_strategies", Strategy, _Registered, "strategy")

    def _collect_records(self, hook: str, record: type, registered: type, kind: str) -> dict[str, Any]:
        """Every record a registration hook returns, by name; a name registered twice is an error."""
        out: dict[str, Any] = {}
        # get_hookimpls is in registration order; keep it so listings are stable.
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            pname = impl.plugin_name
            dist = self._dist.get(pname, (pname, None))[0] or pname
            result: Any = self._call_registration(impl, hook)
            for strategy in result or ():
                valid = isinstance(strategy, record)  # (not narrowing: records are read by name below)
                if not valid:
                    raise PluginError(
                        f"plugin {pname!r} (distribution {dist}) returned {strategy!r} from "
                        f"{hook}; return dcplan.{record.__name__} records"
                    )
                if strategy.name in out:
                    other = out[strategy.name]
                    raise PluginError(
                        f"{kind} {strategy.name!r} is registered twice: by distribution "
                        f"{other.distribution!r} (plugin {other.plugin!r}) and by distribution "
                        f"{dist!r} (plugin {pname!r}); uninstall one, or disable one with "
                        "DCPLAN_DISABLE_PLUGINS"
                    )
                out[strategy.name] = registered(strategy, pname, dist)
        return dict(sorted(out.items()))

    def strategy_names(self) -> list[str]:
        return list(self.strategies)

    def get_strategy(self, name: str) -> Strategy:
        """The strategy registered as ``name``; an :class:`UnknownStrategyError` that says why not."""
        try:
            return self.strategies[name].strategy
        except KeyError:
            raise UnknownStrategyError(
                name, self.strategy_names(), self.failure_summary(), hint=self._missing_hint(name)
            ) from None

    def resolve_strategy(self, name: str, *, explicit: bool = True) -> Strategy:
        """:meth:`get_strategy`, except that the default strategy, when not chosen explicitly and its
        plugin is not installed, falls back to the built-in ``torch`` strategy with a one-line notice."""
        if not explicit and name == DEFAULT_STRATEGY and name not in self.strategies:
            if not any(_norm(s.distribution) == _norm(DEFAULT_STRATEGY_DIST) for s in self.skipped_plugins):
                warnings.warn(
                    f"dcplan: the default strategy {DEFAULT_STRATEGY!r} is not installed; using the built-in "
                    f"{FALLBACK_STRATEGY!r} strategy (install the {DEFAULT_STRATEGY_DIST} distribution, from a "
                    f"clone: pip install ./plugins/size_balanced)",
                    PluginWarning,
                    stacklevel=3,
                )
                return self.get_strategy(FALLBACK_STRATEGY)
        return self.get_strategy(name)

    def _missing_hint(self, name: str) -> str:
        """Why ``name`` is not registered: disabled, failed, a typo, or not installed."""
        want = _norm(name)
        for s in self.skipped_plugins:
            if want in {_norm(s.entry_point), _norm(s.distribution), _norm(s.distribution).removeprefix("dcplan_")}:
                var = "DCPLAN_DISABLE_PLUGINS" if "DISABLE" in s.reason else "DCPLAN_LOAD_PLUGINS"
                return (f"the plugin {s.entry_point!r} (distribution {s.distribution}) that provides it is installed "
                        f"but {s.reason}; change {var} to use it")
        close = difflib.get_close_matches(name, self.strategy_names(), n=1)
        if close:
            return f"did you mean {close[0]!r}?"
        return ("install the distribution that provides it (from a clone of dcplan: "
                "pip install ./plugins/<name>; `dcplan plugins` lists what is installed)")

    # -- load strategies (dcplan_register_load_strategies) -----------------
    @property
    def load_strategies(self) -> dict[str, _RegisteredLoad]:
        if self._load_strategies is None:
            self._load_strategies = self._collect_load_strategies()
        return self._load_strategies

    def _collect_load_strategies(self) -> dict[str, _RegisteredLoad]:
        return self._collect_records("dcplan_register_load_strategies", LoadStrategy, _RegisteredLoad, "load strategy")

    def get_load_strategy(self, name: str) -> LoadStrategy:
        try:
            return self.load_strategies[name].strategy
        except KeyError:
            close = difflib.get_close_matches(name, list(self.load_strategies), n=1)
            raise UnknownStrategyError(
                name, list(self.load_strategies), self.failure_summary(),
                hint=f"did you mean {close[0]!r}?" if close else "", kind="load strategy",
            ) from None

    def failure_summary(self) -> list[str]:
        return [f.reason() for f in self.failed]

    # -- inspection ----------------------------------------------------
    def plugin_infos(self) -> list[PluginInfo]:
        by_plugin: dict[str, list[str]] = {}
        for sname, reg in self.strategies.items():
            by_plugin.setdefault(reg.plugin, []).append(sname)
        load_by_plugin: dict[str, list[str]] = {}
        for sname, lreg in self.load_strategies.items():
            load_by_plugin.setdefault(lreg.plugin, []).append(sname)
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            dist, version = self._dist.get(name, (None, None))
            infos.append(
                PluginInfo(
                    name=name,
                    distribution=dist,
                    version=version,
                    hooks=tuple(hooks),
                    strategies=tuple(sorted(by_plugin.get(name, []))),
                    builtin=name in self._builtin,
                    load_strategies=tuple(sorted(load_by_plugin.get(name, []))),
                )
            )
        return sorted(infos, key=lambda i: (not i.builtin, i.distribution or "", i.name))

    def origin(self, name: str) -> str:
        """How plugin ``name`` was found (built-in, entry point, ``DCPLAN_PLUGINS``, in-process)."""
        return self._origin.get(name, "?")

    def fingerprint(self) -> tuple[tuple[str, str | None], ...]:
        """A sorted tuple of (plugin, version): ranks compare it to agree."""
        return tuple(sorted((n, self._dist.get(n, (None, None))[1]) for n, _ in self.pm.list_name_plugin()))

    @property
    def hook(self) -> Any:
        return self.pm.hook


def _cli_plugin_names() -> set[str]:
    """Entry-point and distribution names of the ``dcplan.cli`` group (selection names may match those)."""
    names: set[str] = set()
    for dist in md.distributions():
        try:
            eps = [ep.name for ep in dist.entry_points if ep.group == CLI_ENTRY_POINT_GROUP]
            if eps:
                names.update(_norm(n) for n in eps)
                names.add(_norm(str(dist.metadata["Name"] or "?")))
        except Exception:  # noqa: BLE001 - a half-installed distribution
            continue
    return names


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


_lock = threading.Lock()
_cached: tuple[tuple[Any, ...], DcplanPluginManager] | None = None
_ENV_KEYS = ("DCPLAN_LOAD_PLUGINS", "DCPLAN_DISABLE_PLUGINS", "DCPLAN_STRICT_PLUGINS", "DCPLAN_PLUGINS")


def get_plugin_manager() -> DcplanPluginManager:
    """The process-wide manager, rebuilt when the selection env vars change."""
    global _cached
    key = tuple(os.environ.get(k) for k in _ENV_KEYS)
    with _lock:
        if _cached is None or _cached[0] != key:
            _cached = (key, DcplanPluginManager())
        return _cached[1]


def reset_plugin_manager() -> None:
    """Forget the cached manager (after installing or removing plugins in-process)."""
    global _cached
    with _lock:
        _cached = None


class HookedPlannerMixin:
    """What dcplan's save and load planners share: lazy plugin manager access.

    The manager is not pickled (``async_save`` with a process checkpointer pickles
    the planner); the unpickled planner picks up the process-wide one.
    """

    _pm: DcplanPluginManager | None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pm"] = None
        return state

    @property
    def plugin_manager(self) -> DcplanPluginManager:
        if self._pm is None:
            self._pm = get_plugin_manager()
        return self._pm

    @property
    def hook(self) -> Any:
        return self.plugin_manager.hook
