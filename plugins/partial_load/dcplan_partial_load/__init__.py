"""dcplan-partial-load: load what the checkpoint has, skip what it lacks.

Enable it by config (``partial_load = true`` in ``dcplan.toml`` / ``[tool.dcplan]``,
``DCPLAN_PARTIAL_LOAD=1``) or per planner::

    dcp.load(sd, storage_reader=dcplan.FileSystemReader(path),
             planner=dcplan.LoadPlanner(partial_load=True))

* keys of the state dict that the checkpoint lacks are left untouched instead of
  failing the load;
* keys matching ``skip_mismatch_keys`` (``fnmatch`` patterns, matched against the
  flattened key ``model.head.weight`` or the nested spelling ``model['head']['weight']``)
  are left untouched when their shape differs from the checkpoint's; any other
  shape mismatch stays an error;
* the planner's :attr:`dcplan.LoadPlanner.report` lists missing, unexpected and
  mismatched keys; the coordinator logs the merged report once.

Without this plugin (or with it disabled) loading is strict, and a planner configured
with ``partial_load``/``skip_mismatch_keys`` refuses to be built.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import dcplan

__all__ = ["matches_any"]


def matches_any(key: str, nested: str, patterns: Sequence[str]) -> bool:
    """Whether a key (flattened or nested spelling) matches one of the ``fnmatch`` patterns."""
    return any(fnmatchcase(key, p) or fnmatchcase(nested, p) for p in patterns)


@dcplan.hookimpl
def dcplan_missing_keys_policy(planner: Any, missing: Sequence[str], config: dcplan.Config) -> str | None:
    """``"skip"`` when ``partial_load`` is on; otherwise defer (strict)."""
    return "skip" if config.partial_load else None


@dcplan.hookimpl(tryfirst=True)
def dcplan_create_local_load_plan(planner: Any, state_dict: dict[str, Any], metadata: Any) -> None:
    """Add shape-mismatched keys allowed by ``skip_mismatch_keys`` to ``planner.skip_keys``.

    Returns ``None``: the plan itself is built by the next implementation (the built-in
    skips ``planner.skip_keys`` and raises on any other shape mismatch).
    """
    patterns = tuple(getattr(planner.config, "skip_mismatch_keys", ()))
    if not patterns:
        return None
    for m in getattr(planner, "mismatches", ()):
        if m.shape_differs and matches_any(m.key, m.nested, patterns):
            planner.skip_keys.add(m.key)
    return None
