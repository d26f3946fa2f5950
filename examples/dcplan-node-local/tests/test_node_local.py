"""Unit tests and the conformance kit for the node_local strategy (no processes)."""

from __future__ import annotations

import json

import pytest

import dcplan
from dcplan.testing.plans import bytes_item, plan, replicated_plans, tensor_item
from dcplan_node_local import node_ids, node_local


def writers(plans):
    return {i.index.fqn: r for r, p in enumerate(plans) for i in p.items}


def test_node_ids_rules(monkeypatch):
    assert node_ids(4, nodes=[0, 0, 1, 1]) == [0, 0, 1, 1]
    assert node_ids(6, ranks_per_node=2) == [0, 0, 1, 1, 2, 2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert node_ids(6) == [0, 0, 0, 1, 1, 1]
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert node_ids(4) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"nodes": [0, 1]}, "one integer node id per rank"), ({"ranks_per_node": -1}, "integer >= 0")],
)
def test_bad_options_name_the_fix(kwargs, words):
    with pytest.raises(ValueError, match=words):
        node_local(replicated_plans(4, [tensor_item("w", (4,))]), **kwargs)


def test_items_stay_on_the_node_of_the_group_coordinator():
    w = [tensor_item(f"w{i}", (8,)) for i in range(4)]
    node1 = tensor_item("n1", (64,))
    pair = tensor_item("pair", (2,))
    plans = [
        plan(w),
        plan([*w, pair]),
        plan([*w, node1, pair]),
        plan([*w, node1, bytes_item("obj", 3)]),
    ]
    out = node_local(plans, ranks_per_node=2)
    who = writers(out)
    assert {who[f"w{i}"] for i in range(4)} == {0, 1}  # group {0..3}: node 0, balanced over ranks 0 and 1
    assert who["n1"] in (2, 3)  # group {2, 3}: node 1
    assert who["pair"] == 1  # group {1, 2}: lead 1 is on node 0, and rank 1 holds it
    assert who["obj"] == 3
    # one node: it balances over every holder, node 1's ranks included
    assert len({writers(node_local(plans, nodes=[0, 0, 0, 0]))[f"w{i}"] for i in range(4)}) >= 3


def test_registered_and_listed_by_the_cli(capsys):
    pm = dcplan.get_plugin_manager()
    assert "node_local" in pm.strategy_names()
    from dcplan.cli.main import main

    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["strategies"]["node_local"]["distribution"] == "dcplan-node-local"
    assert listing["strategies"]["node_local"]["options"] == {"ranks_per_node": 0, "nodes": None}


def test_selected_by_config(tmp_path):
    (tmp_path / "dcplan.toml").write_text('strategy = "node_local"\nstrategy_options = { ranks_per_node = 2 }\n')
    planner = dcplan.SavePlanner()
    assert planner.strategy.name == "node_local"
    assert planner.strategy_options == {"ranks_per_node": 2, "nodes": None}


def test_conforms(dcplan_conformance):
    dcplan_conformance(node_local)


def test_conforms_by_name_with_two_ranks_per_node(dcplan_conformance):
    dcplan_conformance("node_local", {"ranks_per_node": 2}, max_examples=50)
