"""dcplan's pytest plugin (entry point ``pytest11: dcplan``): the conformance fixture and a gloo pool.

Installed with dcplan, so a plugin author's test suite gets it with no setup::

    def test_my_strategy_conforms(dcplan_conformance):
        dcplan_conformance(my_strategy)

For integration tests with real processes, one pool of gloo ranks per test module
(starting a process that imports torch costs seconds)::

    from dcplan.testing.pytest_plugin import gloo_pool_fixture

    pool = gloo_pool_fixture(4)          # a module-scoped fixture named ``pool``

    def test_roundtrip(pool, tmp_path):
        results = pool.run(my_module.save_and_load, str(tmp_path))

``--dcplan-max-examples N`` (or the ``dcplan_max_examples`` ini key) sets how many
generated workloads each check tries. This module imports nothing heavy: torch
and hypothesis are imported when the fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

__all__ = ["dcplan_conformance", "gloo_pool_fixture"]

DEFAULT_MAX_EXAMPLES = 100


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dcplan", "dcplan conformance kit")
    group.addoption(
        "--dcplan-max-examples",
        type=int,
        default=None,
        help=f"generated workloads per dcplan_conformance check (default {DEFAULT_MAX_EXAMPLES})",
    )
    parser.addini("dcplan_max_examples", "generated workloads per dcplan_conformance check", default="")


def _max_examples(config: pytest.Config) -> int:
    opt = config.getoption("dcplan_max_examples", default=None)
    if opt:
        return int(opt)
    ini = config.getini("dcplan_max_examples")
    return int(ini) if ini else DEFAULT_MAX_EXAMPLES


@pytest.fixture
def dcplan_conformance(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Check a dedup strategy against dcplan's contract; fails the test naming the broken invariant.

    Call it with a strategy function, a :class:`dcplan.Strategy` or an installed
    strategy's name, plus optional ``options`` and any keyword argument of
    :func:`dcplan.testing.kit.check_strategy`. It returns the
    :class:`dcplan.testing.kit.ConformanceResult`.
    """
    default = _max_examples(request.config)

    def check(strategy: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        from dcplan.testing.kit import check_strategy

        kwargs.setdefault("max_examples", default)
        return check_strategy(strategy, options, **kwargs)

    return check


def gloo_pool_fixture(world_size: int, *, env: Mapping[str, str] | None = None, timeout: float = 180.0) -> Any:
    """A module-scoped pytest fixture yielding a :class:`dcplan.testing.procs.GlooPool` of ``world_size`` ranks.

    Assign it to a module-level name (the fixture's name)::

        pool = gloo_pool_fixture(3, env={"MY_PLUGIN_DEBUG": "1"})

    :param env: environment variables set in every rank's process.
    :param timeout: seconds a call of ``pool.run`` may take before the pool is declared hung.
    """

    @pytest.fixture(scope="module")
    def pool() -> Any:
        from dcplan.testing.procs import GlooPool

        with GlooPool(world_size, env=dict(env) if env else None, timeout=timeout) as p:
            yield p

    return pool
