"""dcplan's configuration: one frozen, validated :class:`Config`.

Sources, highest precedence first:

1. keyword arguments to a planner, or a :class:`Config` object passed as ``config=``;
2. ``DCPLAN_*`` environment variables (``DCPLAN_STRATEGY=lowest_rank``);
3. ``dcplan.toml`` (top-level keys), the nearest one from the working directory up;
4. ``[tool.dcplan]`` in ``pyproject.toml``, the nearest one from the working directory up;
5. the defaults below.

:func:`resolve_config` returns the config and, for each key, where it came from;
``dcplan config`` prints that.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from dcplan.errors import ConfigError

__all__ = ["Config", "resolve_config", "ENV_PREFIX", "config_keys", "parse_bool", "parse_name_list"]

ENV_PREFIX = "DCPLAN_"
#: DCPLAN_* variables that select plugins rather than set config keys.
PLUGIN_ENV = frozenset(
    {"DCPLAN_LOAD_PLUGINS", "DCPLAN_DISABLE_PLUGINS", "DCPLAN_STRICT_PLUGINS", "DCPLAN_PLUGINS"}
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_bool(raw: str, name: str) -> bool:
    """The one boolean parser of dcplan's environment variables (config keys and plugin switches).

    ``1/true/yes/on`` are true, ``0/false/no/off`` and the empty string false (any case);
    anything else is a :class:`ConfigError` naming the variable ``name``.
    """
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def parse_name_list(raw: str) -> list[str]:
    """A comma-separated list of names (plugin selection variables), blanks dropped."""
    return [p.strip() for p in raw.split(",") if p.strip()]


def _str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"strategy_options must be a table/dict, got {value!r}")
    return dict(value)


def _bool(inst: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, got {value!r}")


def _nonempty_str(inst: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _opt_str(inst: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{attribute.name} must be a non-empty string or unset, got {value!r}")


def _positive_int(inst: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """dcplan's settings. Every field can be set by each source.

    Attributes:
        strategy: the dedup strategy's name, as registered by a plugin
            (``dcplan plugins`` lists them). Env: ``DCPLAN_STRATEGY``.
        strategy_options: options for that strategy (a TOML table / JSON object;
            env ``DCPLAN_STRATEGY_OPTIONS='{"mode": "torch"}'`` or ``mode=torch``).
        partial_load: skip state-dict keys the checkpoint lacks instead of failing
            (needs ``dcplan-partial-load``). Env: ``DCPLAN_PARTIAL_LOAD``.
        skip_mismatch_keys: keys (fnmatch patterns, flattened or nested spelling)
            left untouched when their shape differs from the checkpoint's, instead
            of failing the load (needs ``dcplan-partial-load``; dtype differences
            are cast, as torch does, and only reported).
        plan_cache: reuse save plans across saves of an unchanged structure.
        plan_cache_size: how many cache entries (namespaces) to keep.
        cache_namespace: the cache namespace; default derived from the state dict.
        plan_cache_dir: a directory where the coordinator keeps save plans across
            job restarts (see ``dcplan.save.store``); unset: off.
        validate: run the core's checks on the coordinator: consistency of replicated
            keys, verification of the strategy's output, global-plan validation (only
            switch off for trusted layouts).
        report: log the plan report at INFO on the coordinator after each save.
        trust_checkpoint: unpickle non-tensor items and ``.metadata`` with the full
            pickle module. DANGEROUS: a crafted checkpoint can run code.
        trusted_globals: ``"package.module.Class"`` names the safe loaders admit.
        load_strategy: the load strategy's name, as registered by a plugin
            (``default``: every rank reads what it needs; ``cooperative`` from
            ``dcplan-coop-load``: each shared byte is read once). Env: ``DCPLAN_LOAD_STRATEGY``.
        load_strategy_options: options for that load strategy (a TOML table / JSON object).
        host: the host name this rank reports with its save plan (default
            ``socket.gethostname()``); ranks reporting the same host form a node
            (per-node report, ``size_balanced``'s ``balance = "node"``). Env:
            ``DCPLAN_HOST`` (tests, containers whose host names differ per rank).
    """

    strategy: str = attrs.field(default="size_balanced", validator=_nonempty_str)
    strategy_options: dict[str, Any] = attrs.field(factory=dict, converter=_options)
    partial_load: bool = attrs.field(default=False, validator=_bool)
    skip_mismatch_keys: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    plan_cache: bool = attrs.field(default=False, validator=_bool)
    plan_cache_size: int = attrs.field(default=8, validator=_positive_int)
    cache_namespace: str | None = attrs.field(default=None, validator=_opt_str)
    plan_cache_dir: str | None = attrs.field(default=None, validator=_opt_str)
    validate: bool = attrs.field(default=True, validator=_bool)
    report: bool = attrs.field(default=True, validator=_bool)
    trust_checkpoint: bool = attrs.field(default=False, validator=_bool)
    trusted_globals: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    load_strategy: str = attrs.field(default="default", validator=_nonempty_str)
    load_strategy_options: dict[str, Any] = attrs.field(factory=dict, converter=_options)
    host: str | None = attrs.field(default=None, validator=_opt_str)

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out


def config_keys() -> list[str]:
    return [a.name for a in attrs.fields(Config)]


_FIELDS = {a.name: a for a in attrs.fields(Config)}


def _type_of(name: str) -> str:
    default = _FIELDS[name].default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()  # type: ignore[union-attr]
    if name in ("cache_namespace", "plan_cache_dir"):
        return "str"
    return type(default).__name__


def _parse_env(name: str, raw: str) -> Any:
    kind = _type_of(name)
    if kind == "bool":
        return parse_bool(raw, f"{ENV_PREFIX}{name.upper()}")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not an integer") from None
    if kind == "dict":
        raw = raw.strip()
        if not raw:
            return {}
        if raw.startswith("{"):
            try:
                return json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} is not valid JSON: {exc}") from None
        out: dict[str, Any] = {}
        for part in raw.split(","):
            if "=" not in part:
                raise ConfigError(
                    f"{ENV_PREFIX}{name.upper()}: {part!r} is not key=value; "
                    'use "a=1,b=x" or a JSON object'
                )
            k, v = part.split("=", 1)
            try:
                out[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                out[k.strip()] = v.strip()
        return out
    if kind == "tuple":
        return raw
    return raw


def _check_keys(data: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown dcplan config key(s) {', '.join(map(repr, unknown))} in {source}; "
            f"valid keys: {', '.join(config_keys())}"
        )


def toml_value(value: Any) -> str:
    """``value`` as TOML writes it (``true``, ``"balanced"``, ``[1, 2]``, ``{ a = 1 }``); ``None`` as unset."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def known_env_vars() -> list[str]:
    """Every ``DCPLAN_*`` variable dcplan reads: one per config key, and the plugin selection ones."""
    return sorted([ENV_PREFIX + k.upper() for k in config_keys()] + list(PLUGIN_ENV))


def _unknown_env(key: str) -> None:
    """A ``DCPLAN_*`` variable no key claims: a near miss of a real one is an error, others a warning."""
    known = known_env_vars()
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
    if close and not key.startswith(ENV_PREFIX + "TEST_"):
        raise ConfigError(f"unknown environment variable {key}; did you mean {close[0]}?")
    warnings.warn(
        f"dcplan ignores the environment variable {key}: no dcplan setting has that name "
        f"(dcplan reads {', '.join(known)})",
        UserWarning,
        stacklevel=4,
    )


def _find_up(start: Path, name: str) -> Path | None:
    for d in (start, *start.parents):
        p = d / name
        if p.is_file():
            return p
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _sources(cwd: Path, env: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """Lowest precedence first."""
    layers: list[tuple[str, dict[str, Any]]] = []
    py = _find_up(cwd, "pyproject.toml")
    if py is not None:
        data = _read_toml(py).get("tool", {}).get("dcplan")
        if data is not None:
            if not isinstance(data, dict):
                raise ConfigError(f"[tool.dcplan] in {py} must be a table")
            _check_keys(data, f"[tool.dcplan] in {py}")
            layers.append((f"[tool.dcplan] in {py}", data))
    dt = _find_up(cwd, "dcplan.toml")
    if dt is not None:
        data = _read_toml(dt)
        data = data.get("dcplan", data) if set(data) == {"dcplan"} else data
        _check_keys(data, str(dt))
        layers.append((str(dt), data))
    env_data: dict[str, Any] = {}
    for key, raw in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or key in PLUGIN_ENV:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _FIELDS:
            _unknown_env(key)
            continue
        env_data[name] = _parse_env(name, raw)
    if env_data:
        layers.append(("environment (DCPLAN_*)", env_data))
    return layers


def resolve_config(
    config: Config | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Merge every source into a :class:`Config`.

    :param config: a :class:`Config` (used as is, highest precedence) or a mapping
        of keys (treated like keyword arguments).
    :param overrides: keyword arguments; they win over everything.
    :returns: ``(config, sources)`` where ``sources[key]`` names where each value
        came from.
    """
    env = os.environ if env is None else env
    base = Path(cwd) if cwd is not None else Path.cwd()
    values: dict[str, Any] = {}
    where: dict[str, str] = dict.fromkeys(config_keys(), "default")
    if isinstance(config, Config):
        values = config.to_dict()
        where = dict.fromkeys(config_keys(), "Config object")
    else:
        for source, data in _sources(base, env):
            for k, v in data.items():
                values[k] = v
                where[k] = source
        if config is not None:
            _check_keys(config, "the config mapping")
            for k, v in config.items():
                values[k] = v
                where[k] = "keyword arguments"
    if overrides:
        _check_keys(overrides, "keyword arguments")
        for k, v in overrides.items():
            values[k] = v
            where[k] = "keyword arguments"
    try:
        cfg = Config(**values)
    except ConfigError as exc:
        bad = next((k for k in values if k in str(exc)), None)
        origin = f" (from {where[bad]})" if bad else ""
        raise ConfigError(f"{exc}{origin}") from None
    except TypeError as exc:  # pragma: no cover - attrs converter errors
        raise ConfigError(str(exc)) from None
    return cfg, where
