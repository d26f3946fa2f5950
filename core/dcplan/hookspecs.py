"""Hook specifications: the API reference for dcplan plugins.

Every hook is prefixed ``dcplan_``. A plugin implements any subset of them
with the :data:`dcplan.hookimpl` marker and registers through the ``dcplan``
entry-point group::

    [project.entry-points.dcplan]
    my_strategy = "my_package.plugin"

Call semantics (pluggy): implementations run newest-registered first;
``firstresult`` hooks stop at the first implementation that returns something
other than ``None``; the others collect every non-``None`` result in a list.
dcplan's built-in behaviour is itself a plugin (``dcplan.builtin``) that is
registered *first*, so any third-party implementation of a ``firstresult`` hook
runs before it and may override it by returning a value, or defer by returning
``None``.

Where a hook runs ("every rank" / "coordinator only") follows torch's DCP
protocol: ``dcp.save`` calls ``set_up_planner`` and ``create_local_plan`` on
every rank, ``create_global_plan`` on the coordinator (rank 0 of the process
group) only, and ``finish_plan`` on every rank with the coordinator's answer.
``dcp.load`` does the same with load plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import LoadPlan, SavePlan

    from dcplan.config import Config
    from dcplan.load.planner import LoadPlanner
    from dcplan.save.planner import SavePlanner
    from dcplan.types import LoadStrategy, Strategy

hookspec = pluggy.HookspecMarker("dcplan")

# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------


@hookspec
def dcplan_register_strategies() -> Sequence[Strategy]:
    """Register named dedup strategies.

    :returns: a sequence of :class:`dcplan.Strategy` records (name, callable,
        description, options). Config's ``strategy`` key picks one by name.
    :runs on: every process that builds a plugin manager (every rank, and the
        CLI), once per manager.
    :results: all collected. Two plugins that register the same name are an
        error naming both distributions.
    """


@hookspec
def dcplan_register_load_strategies() -> Sequence[LoadStrategy]:
    """Register named load strategies (how the ranks of a load share the reading).

    :returns: a sequence of :class:`dcplan.LoadStrategy` records (name, global-plan
        callable, description, options, optional per-rank ``local_info`` and
        ``start``). Config's ``load_strategy`` key picks one by name; the built-in
        registers ``default`` (every rank reads what it needs, torch's behaviour).
    :runs on: every process that builds a plugin manager (every rank, and the
        CLI), once per manager.
    :results: all collected. Two plugins that register the same name are an
        error naming both distributions.
    """


@hookspec
def dcplan_safe_globals() -> Sequence[Any]:
    """Contribute types that the safe loaders may unpickle.

    :returns: a sequence of classes/functions, or ``"module.Qualname"`` strings,
        that are admitted by the weights-only unpickler used for non-tensor
        items and by the allow-list ``.metadata`` reader.
    :runs on: every rank that loads, before any bytes are unpickled.
    :results: all collected and merged with config's ``trusted_globals``.
    """


# --------------------------------------------------------------------------
# Save side
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def dcplan_create_local_save_plan(
    planner: SavePlanner, state_dict: dict[str, Any], is_coordinator: bool
) -> SavePlan | None:
    """Create this rank's local save plan.

    :param planner: the :class:`dcplan.SavePlanner` being driven by ``dcp.save``.
    :param state_dict: the *flattened* state dict (nested keys joined by ``.``,
        ShardedTensors flattened), exactly as the planner will resolve data from.
    :param is_coordinator: whether this rank is the coordinator.
    :returns: a ``SavePlan`` whose items cover what this rank holds (replicated
        items included: dedup happens later), or ``None`` to defer.
    :runs on: every rank.
    :results: first non-``None`` result wins. The built-in emits one item per
        tensor, DTensor/ShardedTensor shard held by this rank (none for a
        DTensor whose sub-mesh excludes this rank) and non-tensor object.
    """


@hookspec(firstresult=True)
def dcplan_dedup(
    all_plans: Sequence[SavePlan], strategy: Strategy, options: dict[str, Any], config: Config, index: Any
) -> list[SavePlan] | None:
    """Apply the configured dedup strategy to the gathered local plans.

    :param all_plans: one local plan per rank, in rank order. Must not be mutated
        (the planner passes copies of the item lists the ranks sent, so a
        mutation cannot change what the ranks write).
    :param strategy: the :class:`dcplan.Strategy` config selected.
    :param options: the strategy's resolved options (defaults + config).
    :param config: the planner's resolved :class:`dcplan.Config`.
    :param index: the :class:`dcplan.save.index.PlanIndex` of ``all_plans``, built
        once per save by the planner (an implementation may leave it out of its
        signature).
    :returns: a new list with one plan per rank in which every item is written
        by exactly one of its holders, or ``None`` to defer. The planner sets
        each returned plan's ``planner_data`` back to the rank's own mapping. The built-in calls
        ``strategy.func(all_plans, **options)``, adding ``index=index`` when the
        function declares an ``index`` parameter.
    :runs on: the coordinator only.
    :results: first non-``None`` result wins.
    """


@hookspec(firstresult=True)
def dcplan_create_save_metadata(
    all_plans: Sequence[SavePlan], config: Config
) -> tuple[list[SavePlan], Metadata] | None:
    """Build the global plan and the checkpoint ``Metadata`` from deduped plans.

    :param all_plans: the deduped plans, one per rank, ``planner_data`` holding
        each rank's flattening mapping.
    :param config: the planner's resolved config.
    :returns: ``(global_plan, metadata)``: the plans with index hints rewritten
        and the ``Metadata`` whose ``planner_data`` merges every rank's mapping,
        or ``None`` to defer.
    :runs on: the coordinator only.
    :results: first non-``None`` result wins.
    """


@hookspec
def dcplan_validate_global_plan(global_plan: Sequence[SavePlan], metadata: Metadata) -> list[str]:
    """Check a global save plan before anything is written.

    :param global_plan: the plans from ``dcplan_create_save_metadata``.
    :param metadata: the metadata that will be written.
    :returns: a list of error messages (empty when valid). Any message makes
        the save fail on every rank before a byte is written.
    :runs on: the coordinator only.
    :results: all collected and concatenated. The built-in checks chunk bounds,
        overlaps (sweep line, O(n log n) in every layout), coverage and
        consistent dtype/size across ranks.
    """


@hookspec(firstresult=True)
def dcplan_finish_save_plan(
    planner: SavePlanner, central_plan: SavePlan, cache: Any
) -> SavePlan | None:
    """Turn the coordinator's answer into this rank's final plan.

    :param planner: the save planner.
    :param central_plan: the plan the coordinator scattered to this rank. With
        plan caching on it may be an "unchanged" marker, meaning "reuse your
        cached final plan".
    :param cache: the planner's plan cache (:class:`dcplan.save.cache.PlanCache`),
        or ``None`` when caching is off.
    :returns: the final ``SavePlan`` this rank writes, or ``None`` to defer.
    :runs on: every rank.
    :results: first non-``None`` result wins.
    """


@hookspec
def dcplan_plan_report(report: Any, config: Config) -> None:
    """Observe the plan report of a save.

    :param report: a :class:`dcplan.save.report.PlanReport` (bytes and items per
        rank, busiest rank, lower bound and their ratio).
    :param config: the planner's config.
    :returns: nothing.
    :runs on: the coordinator only, once per save, after validation.
    :results: all implementations are called; results are ignored.
    """


# --------------------------------------------------------------------------
# Load side
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def dcplan_set_up_load_state_dict(
    planner: LoadPlanner, state_dict: dict[str, Any], metadata: Metadata, is_coordinator: bool
) -> dict[str, Any] | None:
    """Prepare the state dict a load will fill, before it is flattened.

    :param planner: the :class:`dcplan.LoadPlanner`.
    :param state_dict: the user's (nested) state dict, possibly empty.
    :param metadata: the checkpoint metadata.
    :param is_coordinator: whether this rank is the coordinator.
    :returns: the state dict to load into (it may be the same object, filled
        in place), or ``None`` to keep ``state_dict`` as it is. The result is
        then flattened with torch's rules. (``dcplan-empty-load`` does not use
        this hook: its planner rebuilds the dict *and* the flattening mapping
        from the metadata, so keys written by other tools keep their names.)
    :runs on: every rank.
    :results: first non-``None`` result wins.
    """


@hookspec(firstresult=True)
def dcplan_missing_keys_policy(
    planner: LoadPlanner, missing: Sequence[str], config: Config
) -> str | None:
    """Decide what happens to requested keys that the checkpoint lacks.

    :param planner: the load planner.
    :param missing: flattened keys of the state dict that the checkpoint lacks
        (sorted).
    :param config: the planner's config.
    :returns: ``"skip"`` to leave those keys untouched, ``"error"`` to fail the
        load during planning, or ``None`` to defer. The built-in returns
        ``"error"``: loading is strict unless a plugin (``dcplan-partial-load``)
        says otherwise.
    :runs on: every rank, during ``create_local_plan``, before any tensor is read.
    :results: first non-``None`` result wins.
    """


@hookspec(firstresult=True)
def dcplan_create_local_load_plan(
    planner: LoadPlanner, state_dict: dict[str, Any], metadata: Metadata
) -> LoadPlan | None:
    """Create this rank's load plan.

    :param planner: the load planner. ``planner.skip_keys`` holds the keys the
        missing-keys policy chose to skip; ``planner.mismatches`` lists the
        requested tensors whose shape or dtype differs from the checkpoint's
        (:class:`dcplan.load.report.Mismatch`). An implementation may add keys
        to ``planner.skip_keys`` and return ``None`` to let the next one build
        the plan (``dcplan-partial-load`` does this for ``skip_mismatch_keys``).
    :param state_dict: the flattened state dict to fill.
    :param metadata: the checkpoint metadata.
    :returns: a ``LoadPlan`` of read items, or ``None`` to defer. The built-in
        reads every key that is not skipped and raises on shape mismatches.
    :runs on: every rank.
    :results: first non-``None`` result wins.
    """


@hookspec(firstresult=True)
def dcplan_create_global_load_plan(
    planner: LoadPlanner, all_plans: Sequence[LoadPlan]
) -> list[LoadPlan] | None:
    """Combine the ranks' load plans.

    :param planner: the load planner.
    :param all_plans: one load plan per rank, in rank order.
    :returns: one plan per rank, or ``None`` to defer. The built-in returns the
        plans unchanged (each rank reads what it needs).
    :runs on: the coordinator only.
    :results: first non-``None`` result wins.
    """


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


@hookspec
def dcplan_register_commands(subparsers: Any) -> None:
    """Add subcommands to the ``dcplan`` command line.

    :param subparsers: the ``argparse`` sub-parsers action of ``dcplan``. Add a
        command with ``p = subparsers.add_parser(name, help=..., description=...)``,
        its arguments with ``p.add_argument(...)`` and its entry point with
        ``p.set_defaults(func=run)``, where ``run(args) -> int`` returns the exit
        status; a :class:`dcplan.DcplanError` it raises is printed as one line
        (exit status 2).
    :returns: nothing.
    :runs on: the process that runs ``dcplan``, when the command line is built,
        never on a rank of a save or load. These implementations are loaded from
        the ``dcplan.cli`` entry-point group (not ``dcplan``), so that
        ``dcplan --help`` does not import torch: the module an entry point names
        must import torch, and anything heavy, only inside ``run``. dcplan's own
        commands (:mod:`dcplan.cli.commands`) are registered the same way, first.
    :results: all implementations are called; results are ignored. Two
        implementations that add the same command name are an error naming both.
    """
