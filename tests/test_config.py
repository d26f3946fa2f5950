from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dcplan
from dcplan.config import Config, config_keys, resolve_config
from dcplan.errors import ConfigError, UnknownStrategyError


def test_defaults(tmp_path):
    cfg, where = resolve_config(cwd=tmp_path, env={})
    assert cfg == Config()
    assert set(where.values()) == {"default"}


def test_precedence_all_sources(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.dcplan]\nstrategy = "from_pyproject"\nplan_cache_size = 3\npartial_load = true\nreport = false\n'
    )
    (tmp_path / "dcplan.toml").write_text('strategy = "from_dcplan_toml"\nplan_cache_size = 4\npartial_load = false\n')
    env = {"DCPLAN_STRATEGY": "from_env", "DCPLAN_PLAN_CACHE_SIZE": "5"}
    cfg, where = resolve_config(None, {"strategy": "from_kwargs"}, cwd=tmp_path, env=env)
    assert cfg.strategy == "from_kwargs" and where["strategy"] == "keyword arguments"
    assert cfg.plan_cache_size == 5 and where["plan_cache_size"] == "environment (DCPLAN_*)"
    assert cfg.partial_load is False and where["partial_load"].endswith("dcplan.toml")
    assert cfg.report is False and where["report"].startswith("[tool.dcplan] in ")
    assert where["validate"] == "default"


def test_config_object_wins_over_env(tmp_path):
    cfg, where = resolve_config(Config(strategy="lowest_rank"), cwd=tmp_path, env={"DCPLAN_STRATEGY": "x"})
    assert cfg.strategy == "lowest_rank" and where["strategy"] == "Config object"


def test_files_found_in_parent_directories(tmp_path):
    (tmp_path / "dcplan.toml").write_text('strategy = "lowest_rank"\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    cfg, where = resolve_config(cwd=sub, env={})
    assert cfg.strategy == "lowest_rank"


@pytest.mark.parametrize(
    "env,value",
    [
        ({"DCPLAN_PARTIAL_LOAD": "1"}, ("partial_load", True)),
        ({"DCPLAN_PARTIAL_LOAD": "false"}, ("partial_load", False)),
        ({"DCPLAN_STRATEGY_OPTIONS": '{"mode": "torch"}'}, ("strategy_options", {"mode": "torch"})),
        ({"DCPLAN_STRATEGY_OPTIONS": "mode=torch,max_slices=4"}, ("strategy_options", {"mode": "torch", "max_slices": 4})),
        ({"DCPLAN_TRUSTED_GLOBALS": "a.B, c.D"}, ("trusted_globals", ("a.B", "c.D"))),
    ],
)
def test_env_parsing(tmp_path, env, value):
    cfg, _ = resolve_config(cwd=tmp_path, env=env)
    assert getattr(cfg, value[0]) == value[1]


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    (tmp_path / "dcplan.toml").write_text('stratgy = "lowest_rank"\n')
    with pytest.raises(ConfigError) as exc:
        resolve_config(cwd=tmp_path, env={})
    msg = str(exc.value)
    assert "'stratgy'" in msg and "dcplan.toml" in msg
    for key in config_keys():
        assert key in msg


def test_unknown_env_var(tmp_path):
    with pytest.raises(ConfigError, match="DCPLAN_STRATGY.*DCPLAN_STRATEGY"):
        resolve_config(cwd=tmp_path, env={"DCPLAN_STRATGY": "x"})


def test_plugin_selection_env_is_not_config(tmp_path):
    resolve_config(cwd=tmp_path, env={"DCPLAN_DISABLE_PLUGINS": "x", "DCPLAN_STRICT_PLUGINS": "1"})


def test_unknown_kwarg():
    with pytest.raises(ConfigError, match="'bogus'.*valid keys"):
        dcplan.SavePlanner(bogus=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"plan_cache_size": 0}, "plan_cache_size must be an integer >= 1"),
        ({"partial_load": "yes"}, "partial_load must be true or false"),
        ({"strategy": ""}, "strategy must be a non-empty string"),
        ({"strategy_options": 3}, "strategy_options must be a table"),
    ],
)
def test_bad_values(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(None, kwargs, cwd=tmp_path, env={})


def test_bad_value_in_env_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="DCPLAN_PLAN_CACHE_SIZE"):
        resolve_config(cwd=tmp_path, env={"DCPLAN_PLAN_CACHE_SIZE": "many"})


def test_bad_value_names_its_source(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.dcplan]\nplan_cache_size = -1\n")
    with pytest.raises(ConfigError, match=r"from \[tool.dcplan\] in"):
        resolve_config(cwd=tmp_path, env={})


def test_unknown_strategy_lists_choices():
    with pytest.raises(UnknownStrategyError) as exc:
        dcplan.SavePlanner(strategy="nope")
    msg = str(exc.value)
    assert "choose one of" in msg
    for name in dcplan.get_plugin_manager().strategy_names():
        assert name in msg


def test_unknown_strategy_option_lists_valid_options():
    with pytest.raises(ValueError, match="valid options"):
        dcplan.SavePlanner(strategy="lowest_rank", strategy_options={"mode": "x"})


def test_strategy_from_pyproject_is_used(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.dcplan]\nstrategy = "lowest_rank"\n')
    planner = dcplan.SavePlanner()
    assert planner.strategy.name == "lowest_rank"
    assert planner.config_sources["strategy"].startswith("[tool.dcplan]")


def test_cli_config_shows_sources(tmp_path):
    (tmp_path / "dcplan.toml").write_text('strategy = "lowest_rank"\n')
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("DCPLAN_")}
    env["DCPLAN_PLAN_CACHE"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "dcplan.cli.main", "config", "--json"], cwd=tmp_path, env=env,
        capture_output=True, text=True, check=True,
    ).stdout
    data = json.loads(out)
    assert data["strategy"] == {"value": "lowest_rank", "source": str(tmp_path / "dcplan.toml")}
    assert data["plan_cache"] == {"value": True, "source": "environment (DCPLAN_*)"}
    assert data["validate"]["source"] == "default"
    text = subprocess.run(
        [sys.executable, "-m", "dcplan.cli.main", "config"], cwd=tmp_path, env=env, capture_output=True, text=True,
        check=True,
    ).stdout
    assert "lowest_rank" in text and "dcplan.toml" in text


def test_cli_config_error_is_one_line(tmp_path):
    (tmp_path / "dcplan.toml").write_text("nope = 1\n")
    proc = subprocess.run([sys.executable, "-m", "dcplan.cli.main", "config"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("dcplan: error: unknown dcplan config key") and "Traceback" not in proc.stderr
