"""The plugin manager: entry-point discovery, selection, isolation, strategies.

Plugins come from the ``dcplan`` entry-point group. Discovery is deterministic
(sorted by distribution name, then entry-point name) and isolated: a plugin that
fails to import becomes a warning that names its distribution and the error
(``DCPLAN_STRICT_PLUGINS=1`` turns it into an error) and the others still load.

Selection by environment, each a comma-separated list of distribution names
(``dcplan-lowest-rank``) or entry-point names (``lowest_rank``):

* ``DCPLAN_LOAD_PLUGINS``: allow list; only these load (empty string: none).
* ``DCPLAN_DISABLE_PLUGINS``: deny list; these never load.

dcplan's own defaults live in :mod:`dcplan.builtin` and are registered through
the same hooks, before any entry point.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pluggy

from dcplan import hookspecs
from dcplan.errors import PluginError, UnknownStrategyError
from dcplan.types import PluginInfo, Strategy

__all__ = [
    "ENTRY_POINT_GROUP",
    "DcplanPluginManager",
    "get_plugin_manager",
    "reset_plugin_manager",
    "hookimpl",
]

ENTRY_POINT_GROUP = "dcplan"
BUILTIN_PLUGINS: tuple[str, ...] = ("dcplan.builtin",)

#: Marker for hook implementations: ``@dcplan.hookimpl``.
hookimpl = pluggy.HookimplMarker("dcplan")

_TRUE = {"1", "true", "yes", "on"}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


def _env_list(env: Mapping[str, str], key: str) -> list[str] | None:
    if key not in env:
        return None
    return [_norm(p) for p in env[key].split(",") if p.strip()]


@attrs.frozen
class FailedPlugin:
    """A plugin whose entry point could not be loaded."""

    entry_point: str
    distribution: str
    error: str


@attrs.frozen
class _Registered:
    strategy: Strategy
    plugin: str
    distribution: str


class DcplanPluginManager:
    """Wraps a :class:`pluggy.PluginManager` with dcplan's policies."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        entry_points: bool = True,
        extra_plugins: Iterable[tuple[str, Any]] = (),
    ) -> None:
        env = os.environ if env is None else env
        self.pm = pluggy.PluginManager("dcplan")
        self.pm.add_hookspecs(hookspecs)
        self.failed: list[FailedPlugin] = []
        self.skipped: list[str] = []
        self._dist: dict[str, tuple[str | None, str | None]] = {}
        self._builtin: set[str] = set()
        self.strict = env.get("DCPLAN_STRICT_PLUGINS", "").strip().lower() in _TRUE
        self.allow = _env_list(env, "DCPLAN_LOAD_PLUGINS")
        self.deny = _env_list(env, "DCPLAN_DISABLE_PLUGINS") or []

        for modname in BUILTIN_PLUGINS:
            module = importlib.import_module(modname)
            self.pm.register(module, name=modname)
            self._dist[modname] = ("dcplan", _version("dcplan"))
            self._builtin.add(modname)
        if entry_points:
            self._load_entry_points()
        for name, plugin in extra_plugins:
            self.register(plugin, name=name)
        self.pm.check_pending()
        self._strategies: dict[str, _Registered] | None = None

    # -- discovery -----------------------------------------------------
    def _selected(self, ep_name: str, dist_name: str) -> bool:
        names = {_norm(ep_name), _norm(dist_name)}
        if names & set(self.deny):
            return False
        if self.allow is not None and not names & set(self.allow):
            return False
        return True

    def _load_entry_points(self) -> None:
        found: list[tuple[str, str, md.EntryPoint, str, str | None]] = []
        for dist in md.distributions():
            try:  # a half-installed distribution must not break discovery of the others
                dist_name = str(dist.metadata["Name"] or "?")
                eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
                version = dist.version
            except Exception:  # noqa: BLE001
                continue
            for ep in eps:
                found.append((_norm(dist_name), ep.name, ep, dist_name, version))
        seen: set[str] = set()
        for _, _, ep, dist_name, ep_version in sorted(found, key=lambda t: (t[0], t[1])):
            if ep.name in seen:  # the same distribution on sys.path twice
                continue
            seen.add(ep.name)
            if not self._selected(ep.name, dist_name):
                self.skipped.append(dist_name)
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - isolation is the point
                message = f"{type(exc).__name__}: {exc}"
                fail = FailedPlugin(ep.name, dist_name, message)
                self.failed.append(fail)
                if self.strict:
                    raise PluginError(
                        f"dcplan plugin {ep.name!r} from distribution {dist_name!r} failed to "
                        f"load: {message} (DCPLAN_STRICT_PLUGINS is set; unset it to skip "
                        "broken plugins with a warning)"
                    ) from exc
                warnings.warn(
                    f"dcplan plugin {ep.name!r} from distribution {dist_name!r} failed to load "
                    f"and is skipped: {message}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            self._dist[ep.name] = (dist_name, ep_version)

    def register(self, plugin: Any, name: str, distribution: str | None = None) -> None:
        """Register an in-process plugin (tests, notebooks)."""
        self.pm.register(plugin, name=name)
        self._dist[name] = (distribution or name, None)
        self._strategies = None

    # -- strategies ----------------------------------------------------
    @property
    def strategies(self) -> dict[str, _Registered]:
        if self._strategies is None:
            self._strategies = self._collect_strategies()
        return self._strategies

    def _collect_strategies(self) -> dict[str, _Registered]:
        out: dict[str, _Registered] = {}
        impls = self.pm.hook.dcplan_register_strategies.get_hookimpls()
        # get_hookimpls is in call order reversed (registration order); keep
        # registration order so listings are stable.
        for impl in impls:
            pname = impl.plugin_name
            dist = self._dist.get(pname, (pname, None))[0] or pname
            result: Any = impl.function()
            if result is None:
                continue
            for strategy in result:
                if not isinstance(strategy, Strategy):
                    raise PluginError(
                        f"plugin {pname!r} ({dist}) returned {strategy!r} from "
                        "dcplan_register_strategies; return dcplan.Strategy records"
                    )
                if strategy.name in out:
                    other = out[strategy.name]
                    raise PluginError(
                        f"strategy {strategy.name!r} is registered twice: by distribution "
                        f"{other.distribution!r} (plugin {other.plugin!r}) and by distribution "
                        f"{dist!r} (plugin {pname!r}); uninstall one, or disable one with "
                        "DCPLAN_DISABLE_PLUGINS"
                    )
                out[strategy.name] = _Registered(strategy, pname, dist)
        return dict(sorted(out.items()))

    def strategy_names(self) -> list[str]:
        return list(self.strategies)

    def get_strategy(self, name: str) -> Strategy:
        try:
            return self.strategies[name].strategy
        except KeyError:
            raise UnknownStrategyError(name, self.strategy_names(), self.failure_summary()) from None

    def failure_summary(self) -> list[str]:
        return [f"{f.distribution} ({f.entry_point}): {f.error}" for f in self.failed]

    # -- inspection ----------------------------------------------------
    def plugin_infos(self) -> list[PluginInfo]:
        by_plugin: dict[str, list[str]] = {}
        for sname, reg in self.strategies.items():
            by_plugin.setdefault(reg.plugin, []).append(sname)
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
                )
            )
        return sorted(infos, key=lambda i: (not i.builtin, i.distribution or "", i.name))

    def fingerprint(self) -> tuple[tuple[str, str | None], ...]:
        """A sorted tuple of (plugin, version): ranks compare it to agree."""
        return tuple(sorted((n, self._dist.get(n, (None, None))[1]) for n, _ in self.pm.list_name_plugin()))

    @property
    def hook(self) -> Any:
        return self.pm.hook


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


_lock = threading.Lock()
_cached: tuple[tuple[Any, ...], DcplanPluginManager] | None = None
_ENV_KEYS = ("DCPLAN_LOAD_PLUGINS", "DCPLAN_DISABLE_PLUGINS", "DCPLAN_STRICT_PLUGINS")


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
