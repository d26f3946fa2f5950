"""Every hook, implemented by a test plugin, runs and its answer is used (one process, no process group).

Uses the kit's :func:`dcplan.testing.kit.save_and_load`, which runs DCP's whole
protocol in this process, so each test is milliseconds, not a process start.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcplan
from dcplan import compat
from dcplan.save.local import create_local_save_plan
from dcplan.save.metadata import build_global_plan
from dcplan.testing.kit import save_and_load


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g), "meta": {"epoch": 2}}


class Recorder:
    """A plugin object that records which hooks ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []


def test_create_local_save_plan_can_leave_keys_out(tmp_path):
    class DropB(Recorder):
        @dcplan.hookimpl
        def dcplan_create_local_save_plan(self, planner, state_dict, is_coordinator):
            self.calls.append("local")
            assert is_coordinator
            plan = create_local_save_plan({k: v for k, v in state_dict.items() if k != "b"})
            return plan

    plugin = DropB()
    sp, _, _ = save_and_load(_state(), tmp_path, plugins=[plugin], load_into={"a": torch.zeros(4, 3)})
    assert plugin.calls == ["local"]
    keys = set(dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata)
    assert "b" not in keys and "a" in keys
    assert sp.report.items_per_rank == (2,)


def test_dedup_can_defer_to_the_strategy(tmp_path):
    class Watch(Recorder):
        @dcplan.hookimpl
        def dcplan_dedup(self, all_plans, strategy, options, config):
            self.calls.append(f"dedup:{strategy.name}:{len(all_plans)}")
            return None

    plugin = Watch()
    save_and_load(_state(), tmp_path, plugins=[plugin], strategy="torch")
    assert plugin.calls == ["dedup:torch:1"]


def test_create_save_metadata_answer_is_what_is_written(tmp_path):
    class Mark(Recorder):
        @dcplan.hookimpl
        def dcplan_create_save_metadata(self, all_plans, config):
            self.calls.append("metadata")
            global_plan, md, errors = build_global_plan(all_plans)
            assert not errors
            marked = dict(md.planner_data or {})
            marked["dcplan_test_marker"] = ("marker",)
            return global_plan, dataclasses.replace(md, planner_data=marked)

    plugin = Mark()
    _, _, loaded = save_and_load(_state(), tmp_path, plugins=[plugin])
    assert plugin.calls == ["metadata"]
    md = dcp.FileSystemReader(str(tmp_path)).read_metadata()
    assert md.planner_data["dcplan_test_marker"] == ("marker",)
    assert torch.equal(loaded["a"], _state()["a"])


def test_validate_global_plan_errors_stop_the_save(tmp_path):
    class Refuse:
        @dcplan.hookimpl
        def dcplan_validate_global_plan(self, global_plan, metadata):
            return ["key:a is not allowed here"]

    # dcp re-raises the coordinator's error on every rank as a CheckpointException (a BaseException)
    with pytest.raises(BaseException, match="key:a is not allowed here"):
        save_and_load(_state(), tmp_path, plugins=[Refuse()])
    assert not (tmp_path / ".metadata").exists()


def test_finish_save_plan_and_plan_report(tmp_path):
    class Finish(Recorder):
        @dcplan.hookimpl
        def dcplan_finish_save_plan(self, planner, central_plan, cache):
            self.calls.append(f"finish:{len(central_plan.items)}:{cache is None}")
            return central_plan

        @dcplan.hookimpl
        def dcplan_plan_report(self, report, config):
            self.calls.append(f"report:{report.items_per_rank}")

    plugin = Finish()
    sp, _, _ = save_and_load(_state(), tmp_path, plugins=[plugin])
    assert plugin.calls == ["report:(3,)", "finish:3:True"]
    assert len(sp.plan.items) == 3


def test_set_up_load_state_dict_can_provide_the_dict(tmp_path):
    built = {"a": torch.zeros(4, 3), "b": torch.zeros(5), "meta": {"epoch": 0}}

    class Provide(Recorder):
        @dcplan.hookimpl
        def dcplan_set_up_load_state_dict(self, planner, state_dict, metadata, is_coordinator):
            self.calls.append(f"setup:{sorted(state_dict)}:{sorted(metadata.state_dict_metadata)}")
            return built

    plugin = Provide()
    _, lp, _ = save_and_load(_state(), tmp_path, plugins=[plugin], load_into={})
    assert plugin.calls == ["setup:[]:['a', 'b', 'meta.epoch']"]
    assert lp.original_state_dict is built
    assert torch.equal(built["b"], _state()["b"]) and built["meta"]["epoch"] == 2


def test_create_local_load_plan_decides_what_is_read(tmp_path):
    class OnlyA(Recorder):
        @dcplan.hookimpl
        def dcplan_create_local_load_plan(self, planner, state_dict, metadata):
            self.calls.append("local-load")
            md = metadata.state_dict_metadata["a"]
            return compat.LoadPlan(compat.create_read_items("a", md, state_dict["a"]))

    plugin = OnlyA()
    _, _, loaded = save_and_load(_state(), tmp_path, plugins=[plugin])
    assert plugin.calls == ["local-load"]
    assert torch.equal(loaded["a"], _state()["a"])
    assert not loaded["b"].any()  # not read


def test_create_global_load_plan_sees_every_rank(tmp_path):
    class Global(Recorder):
        @dcplan.hookimpl
        def dcplan_create_global_load_plan(self, planner, all_plans):
            self.calls.append(f"global-load:{len(all_plans)}:{len(all_plans[0].items)}")
            return None  # defer to the built-in

    plugin = Global()
    _, _, loaded = save_and_load(_state(), tmp_path, plugins=[plugin])
    assert plugin.calls == ["global-load:1:3"]
    assert torch.equal(loaded["b"], _state()["b"])
