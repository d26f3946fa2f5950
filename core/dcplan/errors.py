"""Exceptions raised by dcplan. Each message says how to fix the problem."""

from __future__ import annotations

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
