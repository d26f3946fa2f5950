"""The conformance kit (dcplan.testing.kit) catches each deliberately broken strategy.

It is also the check that the built-in and shipped strategies honour the
contract, through the ``dcplan_conformance`` fixture of dcplan's pytest plugin.
"""

from __future__ import annotations

import os
import pickle
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import _kit_broken as broken  # noqa: E402

from dcplan.save.local import item_nbytes  # noqa: E402
from dcplan.testing import kit  # noqa: E402
from dcplan.testing.plans import bytes_item, plan, tensor_item  # noqa: E402

BROKEN = [
    (broken.writes_twice, "exactly_once", "written twice"),
    (broken.drops_item, "exactly_once", "dropped"),
    (broken.non_holder, "holder_only", "does not hold"),
    (broken.mutates_input, "no_mutation", "changed in place"),
    (broken.coin_flip, "deterministic", "two calls"),
    (broken.split_with_gap, "exactly_once", "tile"),
]


@pytest.mark.parametrize(("func", "invariant", "words"), BROKEN, ids=[f.__name__ for f, _, _ in BROKEN])
def test_kit_catches_broken_strategy_on_a_minimal_workload(func, invariant, words):
    with pytest.raises(kit.ConformanceError) as info:
        kit.check_strategy(func, max_examples=200, hash_seeds=())
    err = info.value
    assert err.invariant == invariant, str(err)
    assert words in str(err)
    assert f"[{invariant}]" in str(err) and "minimal failing workload" in str(err)
    # hypothesis shrank it: a handful of items on at most 3 ranks
    assert err.plans is not None and len(err.plans) <= 3
    assert sum(len(p.items) for p in err.plans) <= 4, kit.describe_workload(err.plans)


def test_kit_catches_pythonhashseed_dependence():
    """hash_order is stable inside one process: only the other-seed subprocesses see it."""
    sd = [plan([tensor_item("a", (2,)), tensor_item("b", (2,))])] * 2
    assert kit.plan_digest(broken.hash_order(sd)) == kit.plan_digest(broken.hash_order(sd))
    with pytest.raises(kit.ConformanceError) as info:
        kit.check_strategy(broken.hash_order, max_examples=20)
    assert info.value.invariant == "deterministic"
    assert "PYTHONHASHSEED" in str(info.value)
    assert info.value.plans is not None


def test_kit_accepts_a_correct_splitting_strategy():
    result = kit.check_strategy(broken.split_halves, max_examples=100, hash_seeds=())
    assert result.examples >= 50


def test_check_plans_reports_the_broken_invariant_directly():
    plans = [plan([tensor_item("w", (4,)), bytes_item("step", 8)]), plan([tensor_item("z", (2,))])]
    report = kit.check_plans(broken.good_lowest, plans)
    step_bytes = item_nbytes(plans[0].items[1])  # 8 where torch records object sizes (2.8+), else 1
    assert report.bytes_per_rank == (16 + step_bytes, 8)
    with pytest.raises(kit.ConformanceError, match=r"\[holder_only\].*rank 0 writes z, which it does not hold"):
        kit.check_plans(broken.non_holder, plans)


def test_conformance_error_pickles():
    err = kit.ConformanceError("exactly_once", "x is dropped", [plan([tensor_item("x", (1,))])], "s")
    again = pickle.loads(pickle.dumps(err))
    assert (again.invariant, again.detail, again.strategy) == ("exactly_once", "x is dropped", "s")
    assert str(again) == str(err)


def test_unpicklable_strategy_gets_a_clear_error():
    with pytest.raises(TypeError, match="module level"):
        kit.check_strategy(lambda plans: list(plans), max_examples=5)


def test_pytest_plugin_is_registered_through_the_entry_point(request):
    plugin = request.config.pluginmanager.get_plugin("dcplan")
    assert plugin is not None and plugin.__name__ == "dcplan.testing.pytest_plugin"


INSTALLED = [
    ("torch", None),
    ("lowest_rank", None),
    ("size_balanced", None),
    ("size_balanced", {"mode": "torch"}),
    ("split", {"min_slice_bytes": 1}),  # small slices, so that the kit's small tensors are split
]


@pytest.mark.parametrize(("name", "options"), INSTALLED, ids=[f"{n}-{o}" if o else n for n, o in INSTALLED])
def test_installed_strategies_conform(dcplan_conformance, name, options):
    from dcplan.manager import get_plugin_manager

    if name not in get_plugin_manager().strategy_names():
        pytest.skip(f"strategy {name!r} is not installed")
    result = dcplan_conformance(name, options, max_examples=100 if options is None else 60)
    assert result.strategy == name and result.examples > 0 and result.hash_seed_workloads > 0


# the one-line, module-level form a plugin author can use instead of the fixture
test_conformance_test_helper = kit.conformance_test(broken.good_lowest, max_examples=30, hash_seeds=())
