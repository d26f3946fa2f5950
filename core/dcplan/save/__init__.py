"""The save side, one module per step of DCP's save protocol.

1. :mod:`dcplan.save.local` — every rank: its local plan and the plan's digest.
2. gather — torch gathers the local plans on the coordinator.
3. :mod:`dcplan.save.index` — coordinator: who holds what (one pass over the plans).
4. :mod:`dcplan.save.verify` — coordinator: holders agree on each key (before dedup); dedup — the
   strategy picks one writer per item (a plugin); the strategy's output is verified (after dedup).
5. :mod:`dcplan.save.metadata` — coordinator: the checkpoint's metadata and index hints.
6. :mod:`dcplan.save.validate` — coordinator: the global plan is complete and consistent.
7. :mod:`dcplan.save.report` — coordinator: bytes per rank against a lower bound
   (:mod:`dcplan.save.bound`, also used by strategies through the index).
8. scatter and finish — torch scatters the final plans; :mod:`dcplan.save.cache` may reuse them.
9. write — every rank writes what its final plan names (:meth:`dcplan.SavePlanner.resolve_data`).

:mod:`dcplan.save.planner` drives the steps through the hooks.
"""

# -- storage (issue 14): this package is also the function dcplan.save(state_dict, path).
# ``dcplan.save`` names both, and Python binds a package onto its parent whenever it is
# imported, so the package itself is made callable and forwards to dcplan.api.save.
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402
from typing import Any as _Any  # noqa: E402


class _CallableSavePackage(_types.ModuleType):
    def __call__(self, state_dict: _Any, path: _Any, **kwargs: _Any) -> _Any:
        from dcplan.api import save

        return save(state_dict, path, **kwargs)


_sys.modules[__name__].__class__ = _CallableSavePackage
