from __future__ import annotations

import warnings

import pytest
from _fakedist import STRATEGY_SRC, make_dist

import dcplan
from dcplan.errors import PluginError, UnknownStrategyError
from dcplan.manager import DcplanPluginManager


def test_builtin_goes_through_hooks():
    pm = DcplanPluginManager(env={}, entry_points=False)
    info = {i.name: i for i in pm.plugin_infos()}
    assert info["dcplan.builtin"].builtin
    assert "dcplan_create_local_save_plan" in info["dcplan.builtin"].hooks
    assert pm.strategy_names() == ["torch"]


def test_installed_plugins_found():
    pm = DcplanPluginManager(env={})
    names = pm.strategy_names()
    assert {"size_balanced", "lowest_rank", "torch"} <= set(names)
    dists = {i.distribution for i in pm.plugin_infos()}
    assert {"dcplan-size-balanced", "dcplan-lowest-rank"} <= dists


def test_broken_plugin_warns_and_others_load(site):
    make_dist(site, "fake-broken", "fake_broken", "raise ImportError('no module named cuda_magic')\n")
    with pytest.warns(RuntimeWarning, match=r"fake-broken.*ImportError: no module named cuda_magic"):
        pm = DcplanPluginManager(env={})
    assert "lowest_rank" in pm.strategy_names()
    assert [f.distribution for f in pm.failed] == ["fake-broken"]
    with pytest.raises(UnknownStrategyError) as exc:
        pm.get_strategy("broken_one")
    assert "fake-broken" in str(exc.value) and "no module named cuda_magic" in str(exc.value)


def test_broken_plugin_strict_is_an_error(site):
    make_dist(site, "fake-broken", "fake_broken", "raise ImportError('boom')\n")
    with pytest.raises(PluginError, match=r"fake-broken.*boom.*DCPLAN_STRICT_PLUGINS"):
        DcplanPluginManager(env={"DCPLAN_STRICT_PLUGINS": "1"})


def test_duplicate_strategy_names_both_distributions(site):
    make_dist(site, "fake-one", "fake_one", STRATEGY_SRC.format(name="twin"))
    make_dist(site, "fake-two", "fake_two", STRATEGY_SRC.format(name="twin"))
    pm = DcplanPluginManager(env={})
    with pytest.raises(PluginError) as exc:
        pm.strategy_names()
    assert "fake-one" in str(exc.value) and "fake-two" in str(exc.value) and "'twin'" in str(exc.value)


def test_duplicate_resolved_by_deny_list(site):
    make_dist(site, "fake-one", "fake_one", STRATEGY_SRC.format(name="twin"))
    make_dist(site, "fake-two", "fake_two", STRATEGY_SRC.format(name="twin"))
    pm = DcplanPluginManager(env={"DCPLAN_DISABLE_PLUGINS": "fake-two"})
    assert "twin" in pm.strategy_names()
    assert pm.strategies["twin"].distribution == "fake-one"


def test_allow_list_by_distribution_or_entry_point_name():
    pm = DcplanPluginManager(env={"DCPLAN_LOAD_PLUGINS": "dcplan-lowest-rank"})
    assert "lowest_rank" in pm.strategy_names() and "size_balanced" not in pm.strategy_names()
    pm = DcplanPluginManager(env={"DCPLAN_LOAD_PLUGINS": "size_balanced"})
    assert "size_balanced" in pm.strategy_names() and "lowest_rank" not in pm.strategy_names()
    pm = DcplanPluginManager(env={"DCPLAN_LOAD_PLUGINS": ""})
    assert pm.strategy_names() == ["torch"]  # built-ins always load


def test_deny_list():
    pm = DcplanPluginManager(env={"DCPLAN_DISABLE_PLUGINS": "dcplan-size-balanced,lowest_rank"})
    names = pm.strategy_names()
    assert "torch" in names and "size_balanced" not in names and "lowest_rank" not in names
    assert {"dcplan-size-balanced", "dcplan-lowest-rank"} <= set(pm.skipped)


def test_disabled_strategy_gives_choose_one_of(monkeypatch):
    monkeypatch.setenv("DCPLAN_DISABLE_PLUGINS", "dcplan-lowest-rank")
    with pytest.raises(UnknownStrategyError, match="choose one of: .*size_balanced"):
        dcplan.SavePlanner(strategy="lowest_rank")


def test_load_order_is_deterministic(site):
    for name in ["fake_c", "fake_a", "fake_b"]:
        make_dist(site, name.replace("_", "-"), name, STRATEGY_SRC.format(name=name.replace("fake_", "s_")))
    orders = []
    for _ in range(3):
        pm = DcplanPluginManager(env={})
        orders.append([n for n, _ in pm.pm.list_name_plugin()])
    assert orders[0] == orders[1] == orders[2]
    fakes = [n for n in orders[0] if n.startswith("fake_")]
    assert fakes == ["fake_a", "fake_b", "fake_c"]


def test_validation_results_are_collected_from_all_plugins():
    class Extra:
        @dcplan.hookimpl
        def dcplan_validate_global_plan(self, global_plan, metadata):
            return ["custom rule violated"]

    pm = DcplanPluginManager(env={}, entry_points=False, extra_plugins=[("extra", Extra())])
    results = pm.hook.dcplan_validate_global_plan(global_plan=[], metadata=dcplan.compat.Metadata({}))
    assert ["custom rule violated"] in results and [] in results


def test_third_party_firstresult_overrides_builtin():
    class Lenient:
        @dcplan.hookimpl
        def dcplan_missing_keys_policy(self, planner, missing, config):
            return "skip"

    class Deferring:
        @dcplan.hookimpl
        def dcplan_missing_keys_policy(self, planner, missing, config):
            return None

    pm = DcplanPluginManager(env={}, entry_points=False)
    assert pm.hook.dcplan_missing_keys_policy(planner=None, missing=["a"], config=None) == "error"
    pm = DcplanPluginManager(env={}, entry_points=False, extra_plugins=[("lenient", Lenient())])
    assert pm.hook.dcplan_missing_keys_policy(planner=None, missing=["a"], config=None) == "skip"
    pm = DcplanPluginManager(env={}, entry_points=False, extra_plugins=[("deferring", Deferring())])
    assert pm.hook.dcplan_missing_keys_policy(planner=None, missing=["a"], config=None) == "error"


def test_strategy_record_validation():
    with pytest.raises(ValueError, match="lower-case"):
        dcplan.Strategy(name="Bad Name", func=lambda plans: plans)
    with pytest.raises(TypeError):
        dcplan.Strategy(name="ok", func=3)


def test_non_strategy_registration_is_an_error():
    class Bad:
        @dcplan.hookimpl
        def dcplan_register_strategies(self):
            return ["not a record"]

    pm = DcplanPluginManager(env={}, entry_points=False, extra_plugins=[("bad", Bad())])
    with pytest.raises(PluginError, match="return dcplan.Strategy records"):
        pm.strategy_names()


def test_no_warnings_with_clean_install():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DcplanPluginManager(env={})
