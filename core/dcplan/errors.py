"""Exceptions raised by dcplan. Each message says how to fix the problem."""

from __future__ import annotations

import pickle
from collections.abc import Sequence

__all__ = [
    "DcplanError",
    "ConfigError",
    "PluginError",
    "UnknownStrategyError",
    "PlanMismatchError",
    "PlanValidationError",
    "MissingKeysError",
    "PluginWarning",
    "PlanCacheError",
    "CheckpointReadError",
    "MetadataVersionError",
    "UnsafeCheckpointError",
    "RankPlanningError",
    "CorruptCheckpointError",
    "CheckpointPathError",
    "StrategyError",
]


class DcplanError(Exception):
    """Base class of dcplan's errors."""


class ConfigError(DcplanError, ValueError):
    """A config key, value or source is invalid."""


class PluginError(DcplanError, RuntimeError):
    """A plugin failed to load or broke a rule."""


class UnknownStrategyError(ConfigError):
    """Config names a strategy that no loaded plugin registers."""

    def __init__(
        self, name: str, valid: Sequence[str], failed: Sequence[str] = (), hint: str = "", kind: str = "strategy"
    ) -> None:
        self.name = name
        self.valid = list(valid)
        self.failed = list(failed)
        self.hint = hint
        self.kind = kind
        msg = (
            f"unknown dcplan {kind} {name!r}; choose one of: "
            f"{', '.join(self.valid) if self.valid else '(none installed)'}"
        )
        if self.failed:
            msg += "; plugins that failed to load: " + "; ".join(self.failed)
        example = "coop_load" if kind == "load strategy" else "size_balanced"
        msg += f" ({hint})" if hint else (
            f" (install the plugin that provides it, e.g. dcplan-{example.replace('_', '-')}: from a clone of dcplan, "
            f"pip install ./plugins/{example})"
        )
        super().__init__(msg)

    def __reduce__(self) -> tuple:  # type: ignore[type-arg]
        return (type(self), (self.name, self.valid, self.failed, self.hint, self.kind))


class PluginWarning(RuntimeWarning):
    """A plugin was skipped (failed to import or to register), or a plugin selection name matched nothing."""


class PlanMismatchError(DcplanError, RuntimeError):
    """Ranks resolved different strategies, options or plugin sets."""


class PlanValidationError(DcplanError, ValueError):
    """The global save plan is invalid; nothing was written."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        shown = "; ".join(self.errors[:20])
        more = f" (and {len(self.errors) - 20} more)" if len(self.errors) > 20 else ""
        super().__init__(
            f"dcplan: the global save plan is invalid, nothing was written: {shown}{more}"
        )

    def __reduce__(self) -> tuple:  # type: ignore[type-arg]
        # torch pickles exceptions across ranks; keep the structured fields
        return (type(self), (self.errors,))


class MissingKeysError(DcplanError, RuntimeError):
    """Requested keys are missing from the checkpoint and the load is strict."""

    def __init__(self, missing: Sequence[str], nested: Sequence[str] | None = None) -> None:
        self.missing = list(missing)
        self.nested = list(nested or [])
        shown = ", ".join(self.missing)
        msg = f"{len(self.missing)} key(s) of the state dict are missing from the checkpoint: {shown}"
        if self.nested and self.nested != self.missing:
            msg += f" (nested: {', '.join(self.nested)})"
        msg += (
            ". Remove them from the state dict, or allow partial loads "
            "(pip install dcplan-partial-load and set partial_load = true)"
        )
        super().__init__(msg)

    def __reduce__(self) -> tuple:  # type: ignore[type-arg]
        return (type(self), (self.missing, self.nested))


class PlanCacheError(DcplanError, RuntimeError):
    """The plan cache cannot resolve an "unchanged" marker; nothing was written."""


HOW_TO_ALLOW = (
    "if you trust that type, allow it with trusted_globals = [\"{name}\"] (dcplan.toml, "
    "[tool.dcplan], DCPLAN_TRUSTED_GLOBALS or LoadPlanner(trusted_globals=[...])) or a plugin's "
    "dcplan_safe_globals hook; trust_checkpoint = true (CLI: --trust) disables the check for the "
    "whole checkpoint and is DANGEROUS: a crafted checkpoint can run code"
)


class UnsafeCheckpointError(DcplanError, pickle.UnpicklingError):
    """A checkpoint needs a global (class or function) the safe loaders do not admit.

    :ivar key: the state-dict key (or ``".metadata"``) being read.
    :ivar blocked: the blocked globals, ``"module.name"``.
    """

    def __init__(self, key: str, blocked: Sequence[str], detail: str = "") -> None:
        self.key = key
        self.blocked = list(blocked)
        names = ", ".join(self.blocked) if self.blocked else "an unsupported type"
        what = "the checkpoint's .metadata" if key == ".metadata" else f"non-tensor item {key!r}"
        msg = f"refusing to unpickle {what}: it needs {names}, which dcplan's safe loader does not allow"
        if detail:
            msg += f" ({detail})"
        msg += "; " + HOW_TO_ALLOW.format(name=self.blocked[0] if self.blocked else "package.module.Class")
        super().__init__(msg)


class CheckpointReadError(DcplanError, ValueError):
    """A path is not a readable DCP checkpoint (missing, not a checkpoint, corrupted, truncated)."""


class MetadataVersionError(CheckpointReadError):
    """``.metadata`` was written by a newer torch whose format this torch cannot read."""


class CorruptCheckpointError(CheckpointReadError):
    """A data file is missing, empty, truncated or fails its checksum (the message names file and item)."""


class CheckpointPathError(CheckpointReadError):
    """A storage entry points outside the checkpoint directory (``..``, absolute, a symlink out)."""


class StrategyError(PlanValidationError):
    """A dedup strategy's output broke the strategy contract; nothing was written.

    :ivar strategy: the strategy's name; :ivar distribution: where it comes from;
    :ivar violations: the violations found (plain words), first few shown.
    """

    def __init__(self, strategy: str, distribution: str | None, violations: Sequence[str], total: int = 0) -> None:
        self.strategy = strategy
        self.distribution = distribution
        self.violations = list(violations)
        self.total = max(total, len(self.violations))
        DcplanError.__init__(self, self._message())
        self.errors = list(self.violations)

    def _message(self) -> str:
        src = f" (distribution {self.distribution})" if self.distribution else ""
        shown = self.violations[:5]
        more = f"; and {self.total - len(shown)} more" if self.total > len(shown) else ""
        return (
            f"dcplan: strategy {self.strategy!r}{src} returned an invalid plan, nothing was written. "
            f"{self.total} violation(s): " + "; ".join(shown) + more + ". A strategy must give every item that "
            "some rank holds to exactly one of its holders (or cut it into slices, each inside a holder's chunk, "
            "that tile it exactly), keep each item's MetadataIndex.offset equal to its chunk offset, and add "
            "nothing. Fix or report the strategy, or choose another one (strategy = \"size_balanced\")"
        )

    def __reduce__(self) -> tuple:  # type: ignore[type-arg]
        return (type(self), (self.strategy, self.distribution, self.violations, self.total))


class RankPlanningError(DcplanError, RuntimeError):
    """One or more ranks failed while building their planner or local plan; every rank raises this.

    :ivar failures: ``(rank, "ErrorType: message")`` per failed rank.
    """

    def __init__(self, failures: Sequence[tuple[int, str]], side: str = "save") -> None:
        self.failures = [(int(r), str(e)) for r, e in failures]
        self.side = side
        ranks = ", ".join(str(r) for r, _ in self.failures)
        detail = " | ".join(f"rank {r}: {e}" for r, e in self.failures[:8])
        more = f" (and {len(self.failures) - 8} more)" if len(self.failures) > 8 else ""
        super().__init__(
            f"dcplan: the {side} failed during planning on rank(s) {ranks}; nothing was "
            f"{'written' if side == 'save' else 'read'}. {detail}{more}. Fix the problem on "
            "those ranks (their config, DCPLAN_* environment and installed plugins) and retry"
        )

    def __reduce__(self) -> tuple:  # type: ignore[type-arg]
        return (type(self), (self.failures, self.side))
