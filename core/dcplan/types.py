"""Records that plugins return to the core.

These are plain :mod:`attrs` classes so that plugins can build them without
importing torch, and so that the core can validate them when they arrive.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.checkpoint.planner import SavePlan

__all__ = ["Strategy", "StrategyFunc", "LoadStrategy", "PluginInfo"]

#: A dedup strategy: ``func(all_plans, **options) -> list[SavePlan]``.
#: It receives one local plan per rank (index = rank), must return a *new*
#: list of the same length, must never mutate its input and must give each
#: written item to exactly one rank that holds it.
StrategyFunc = Callable[..., "list[SavePlan]"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _check_name(_inst: Any, _attr: Any, value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"strategy name {value!r} is invalid: use lower-case letters, digits and '_', "
            "starting with a letter (e.g. 'size_balanced')"
        )


def _freeze_options(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(value or {})


def _resolve_options(
    name: str,
    defaults: Mapping[str, Any],
    check: Callable[[dict[str, Any]], None] | None,
    given: Mapping[str, Any] | None,
) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "(none)"
        close = [m for u in unknown for m in difflib.get_close_matches(u, sorted(defaults), n=1)]
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"strategy {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {valid}{hint}"
        )
    out = dict(defaults)
    out.update(given)
    if check is not None:
        check(out)
    return out


@attrs.frozen
class Strategy:
    """A named dedup strategy, as returned by ``dcplan_register_strategies``.

    :param name: the name users put in config (``strategy = "name"``).
    :param func: ``func(all_plans: Sequence[SavePlan], **options) -> list[SavePlan]``. A
        function that also declares an ``index`` parameter gets the coordinator's
        :class:`dcplan.save.index.PlanIndex` of ``all_plans`` (built once per save).
    :param description: one line shown by ``dcplan plugins``.
    :param options: the option names the strategy accepts with their defaults.
        Config's ``strategy_options`` may set only these; others are an error.
    :param check_options: optional ``check(options) -> None`` that raises
        ``ValueError`` (naming the valid values) for bad option values. It runs
        when a planner is built, on every rank, before anything is planned.
    """

    name: str = attrs.field(validator=_check_name)
    func: StrategyFunc = attrs.field(validator=attrs.validators.is_callable())
    description: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    options: dict[str, Any] = attrs.field(factory=dict, converter=_freeze_options)
    check_options: Callable[[dict[str, Any]], None] | None = attrs.field(default=None)

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Return the defaults overlaid with ``given``; unknown names are an error."""
        return _resolve_options(self.name, self.options, self.check_options, given)

    @property
    def takes_index(self) -> bool:
        """Whether ``func`` declares an ``index`` parameter (the coordinator's :class:`~dcplan.save.index.PlanIndex`)."""
        return _takes_index(self.func)

    def run(self, all_plans: Sequence[SavePlan], options: Mapping[str, Any], index: Any = None) -> list[SavePlan]:
        """Call ``func`` with resolved ``options``; ``index`` is passed only when ``func`` declares it."""
        if index is not None and self.takes_index:
            return self.func(all_plans, index=index, **options)
        return self.func(all_plans, **options)

    def __call__(self, all_plans: Sequence[SavePlan], index: Any = None, **options: Any) -> list[SavePlan]:
        return self.run(all_plans, self.resolve_options(options), index)


def _takes_index(func: Callable[..., Any]) -> bool:
    import inspect

    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    p = params.get("index")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


@attrs.frozen
class LoadStrategy:
    """A named load strategy, as returned by ``dcplan_register_load_strategies``.

    :param name: the name users put in config (``load_strategy = "name"``).
    :param func: ``func(all_plans, planner, **options) -> list[LoadPlan]``: the global
        load plan, on the coordinator. It receives one local plan per rank (index =
        rank; ``planner_data`` carries each rank's :data:`dcplan.load.strategy.LOAD_INFO_KEY`
        and, when the storage reader calls ``planner.finish_reads``, its
        :data:`dcplan.load.strategy.READER_KEY`), must not mutate them and returns one
        plan per rank.
    :param description: one line shown by ``dcplan plugins``.
    :param options: the option names the strategy accepts with their defaults
        (config's ``load_strategy_options`` may set only these).
    :param check_options: optional ``check(options) -> None`` raising ``ValueError``.
    :param local_info: optional ``local_info(planner, options) -> Any``, run on every rank
        in ``create_local_plan``; the result travels to the coordinator in the local plan.
    :param start: optional ``start(planner, plan, options) -> session | None``, run on
        every rank in ``finish_plan``. A session (:class:`dcplan.load.strategy.LoadSession`)
        may serve ``resolve_tensor``/``commit_tensor``/``load_bytes`` for items it added,
        and runs ``finish_reads`` after the rank's own reads.
    """

    name: str = attrs.field(validator=_check_name)
    func: Callable[..., Any] = attrs.field(validator=attrs.validators.is_callable())
    description: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    options: dict[str, Any] = attrs.field(factory=dict, converter=_freeze_options)
    check_options: Callable[[dict[str, Any]], None] | None = attrs.field(default=None)
    local_info: Callable[..., Any] | None = attrs.field(default=None)
    start: Callable[..., Any] | None = attrs.field(default=None)

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Return the defaults overlaid with ``given``; unknown names are an error."""
        return _resolve_options(self.name, self.options, self.check_options, given)


@attrs.frozen
class PluginInfo:
    """What ``dcplan plugins`` lists for one registered plugin."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    strategies: tuple[str, ...]
    builtin: bool = False
    load_strategies: tuple[str, ...] = ()
