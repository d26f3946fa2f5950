"""The user's side of the CLI and config (issue 18): each stumble a new user hit, as a test.

Subprocess tests run the installed ``dcplan`` script; most of them never import torch and
take a fraction of a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from _cli import BIN
from _cli import cli_env as _env
from _cli import run_cli as _run
from _fakedist import STRATEGY_SRC, make_dist

from dcplan.cli.main import main
from dcplan.config import parse_bool, resolve_config
from dcplan.errors import ConfigError


# ------------------------------------------------------------------ config
def test_typo_in_strategy_is_an_error_with_a_suggestion(tmp_path):
    proc = _run("config", cwd=tmp_path, DCPLAN_STRATEGY="round_robbin")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown dcplan strategy 'round_robbin'" in proc.stderr and "environment" in proc.stderr
    proc = _run("config", cwd=tmp_path, DCPLAN_STRATEGY="lowest_rnk")
    assert proc.returncode == 2 and "did you mean 'lowest_rank'?" in proc.stderr


def test_unknown_strategy_option_is_an_error(tmp_path):
    proc = _run("config", cwd=tmp_path, DCPLAN_STRATEGY_OPTIONS="begin=2")
    assert proc.returncode == 2
    assert "no option(s) 'begin'" in proc.stderr and "valid options: balance, mode" in proc.stderr
    proc = _run("config", cwd=tmp_path, DCPLAN_STRATEGY_OPTIONS="mod=torch")
    assert proc.returncode == 2 and "did you mean 'mode'?" in proc.stderr


def test_disabled_plugin_is_named_as_disabled(tmp_path):
    proc = _run("config", cwd=tmp_path, DCPLAN_DISABLE_PLUGINS="lowest_rank", DCPLAN_STRATEGY="lowest_rank")
    assert proc.returncode == 2
    assert "dcplan-lowest-rank" in proc.stderr and "installed but disabled by DCPLAN_DISABLE_PLUGINS" in proc.stderr
    assert "pip install" not in proc.stderr


def test_selection_names_that_match_nothing_are_warned(tmp_path):
    from dcplan.errors import PluginWarning
    from dcplan.manager import DcplanPluginManager

    with pytest.warns(PluginWarning, match=r"DCPLAN_DISABLE_PLUGINS names 'lowest_rnk'.*did you mean 'lowest_rank'"):
        DcplanPluginManager(env={"DCPLAN_DISABLE_PLUGINS": "lowest_rnk"})
    with pytest.warns(PluginWarning, match=r"DCPLAN_LOAD_PLUGINS names 'nothing_like_it', which matches no"):
        DcplanPluginManager(env={"DCPLAN_LOAD_PLUGINS": "lowest_rank,nothing_like_it"})


def test_unrelated_dcplan_variables_warn_near_misses_fail(tmp_path):
    with pytest.warns(UserWarning, match="DCPLAN_TEST_WORKERS"):
        resolve_config(cwd=tmp_path, env={"DCPLAN_TEST_WORKERS": "2"})
    with pytest.warns(UserWarning, match="DCPLAN_SOMETHING_ELSE"):
        resolve_config(cwd=tmp_path, env={"DCPLAN_SOMETHING_ELSE": "1"})
    with pytest.raises(ConfigError, match="did you mean DCPLAN_STRATEGY"):
        resolve_config(cwd=tmp_path, env={"DCPLAN_STRATEGYY": "x"})
    with pytest.raises(ConfigError, match="did you mean DCPLAN_DISABLE_PLUGINS"):
        resolve_config(cwd=tmp_path, env={"DCPLAN_DISABLE_PLUGIN": "x"})
    proc = _run("config", cwd=tmp_path, DCPLAN_TEST_WORKERS="2")
    assert proc.returncode == 0 and "DCPLAN_TEST_WORKERS" in proc.stderr


def test_one_boolean_parser_everywhere(tmp_path):
    from dcplan.manager import DcplanPluginManager

    assert parse_bool("Yes", "X") is True and parse_bool("off", "X") is False and parse_bool("", "X") is False
    for env in ({"DCPLAN_REPORT": "maybe"}, {"DCPLAN_STRICT_PLUGINS": "maybe"}):
        with pytest.raises(ConfigError, match=r"=\'maybe\' is not a boolean"):
            resolve_config(cwd=tmp_path, env=env)
            DcplanPluginManager(env=env, entry_points=False)


# ------------------------------------------------------------------ CLI conventions
def test_version_names_torch_and_the_plugins(tmp_path):
    proc = _run("--version", cwd=tmp_path)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("dcplan 0.") and "torch 2." in lines[1]
    assert "dcplan-size-balanced-" in lines[2] and "dcplan-empty-load-" in lines[2]


def test_python_dash_m_dcplan(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dcplan", "config", "--json"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["strategy"]["value"] == "size_balanced"


def test_quiet_on_a_closed_pipe(tmp_path):
    proc = subprocess.Popen([str(BIN / "dcplan"), "plugins", "--json"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before dcplan writes (dcplan ... | head -0)
    err = proc.stderr.read().decode()
    proc.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_help_is_fast_and_imports_no_torch(tmp_path):
    code = "import sys; from dcplan.cli.main import main; main(['--help'])"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "convert" in proc.stdout
    assert elapsed < 3.0  # about 0.2 s alone; torch alone takes seconds. Generous: CI machines are shared


def test_subcommand_errors_show_the_subcommands_usage(tmp_path):
    proc = _run("plugins", "--jsn", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: dcplan plugins") and "unrecognized arguments: --jsn" in proc.stderr


def test_plan_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":mod:" not in out and "::" not in out
    assert "dcplan plan: the plan report" in out


def test_plan_only_without_strategy_and_per_rank_without_json(capsys):
    assert main(["plan", "--layout", "ddp", "--model", "tiny", "-n", "4", "--only", "lowest_rank"]) == 0
    assert "bytes per rank with lowest_rank:" in capsys.readouterr().out
    assert main(["plan", "--layout", "ddp", "--model", "tiny", "-n", "4", "--per-rank"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dcplan plan") and "--per-rank" in err and "--json" in err


def test_progress_on_a_terminal_only():
    from dcplan.cli.progress import progress

    class Tty:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    real, sys.stderr = sys.stderr, Tty()
    try:
        assert list(progress(range(3), "work")) == [0, 1, 2]
        shown = sys.stderr.text
    finally:
        sys.stderr = real
    assert "work:" in shown and "0/3" in shown  # tqdm drew a bar (leave=False clears it at the end)
    assert list(progress(range(3), "work", enabled=False)) == [0, 1, 2]


# ------------------------------------------------------------------ dcplan plugins
RAISING = '''
import dcplan

@dcplan.hookimpl
def dcplan_register_strategies():
    raise RuntimeError("registry exploded")
'''


def test_plugins_lists_failed_disabled_and_options(tmp_path, site):
    make_dist(site, "fake-raising", "fake_raising", RAISING)
    env = {"PYTHONPATH": str(site), "DCPLAN_DISABLE_PLUGINS": "dcplan-split"}
    proc = _run("plugins", cwd=tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "FAILED fake-raising (fake_raising): failed in hook dcplan_register_strategies: " \
           "RuntimeError: registry exploded" in out
    assert "Traceback" not in out and "--traceback" in out
    assert "DISABLED dcplan-split 0.1.0 (split): disabled by DCPLAN_DISABLE_PLUGINS" in out
    assert 'options: balance = "rank", mode = "balanced"' in out and "options: save_to_lowest_rank = false" in out
    assert "commands: convert" in out
    proc = _run("plugins", "--traceback", cwd=tmp_path, **env)
    assert "Traceback" in proc.stdout and "fake_raising.py" in proc.stdout
    data = json.loads(_run("plugins", "--json", cwd=tmp_path, **env).stdout)
    assert data["failed"][0]["hook"] == "dcplan_register_strategies"
    assert data["skipped"][0]["reason"] == "disabled by DCPLAN_DISABLE_PLUGINS"
    assert data["strategies"]["split"] if "split" in data["strategies"] else True
    assert data["strategies"]["size_balanced"]["options"] == {"balance": "rank", "mode": "balanced"}
    assert data["commands"]["convert"] == "dcplan-empty-load"


def test_plugins_info(tmp_path):
    proc = _run("plugins", "info", "size_balanced", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.startswith("dcplan-size-balanced") and "entry point size_balanced" in proc.stdout
    proc = _run("plugins", "info", "dcplan-lowest-rank", "--json", cwd=tmp_path, DCPLAN_DISABLE_PLUGINS="lowest_rank")
    assert json.loads(proc.stdout)["status"] == "disabled"
    proc = _run("plugins", "info", "size_balance", cwd=tmp_path)
    assert proc.returncode == 2 and "did you mean 'size_balanced'?" in proc.stderr


def test_registration_failure_names_plugin_and_points_at_it(site):
    from dcplan.errors import PluginError, PluginWarning, UnknownStrategyError
    from dcplan.manager import DcplanPluginManager

    make_dist(site, "fake-raising", "fake_raising", RAISING)
    pm = DcplanPluginManager(env={})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "size_balanced" in pm.strategy_names()  # the others still load
    [w] = [w for w in caught if issubclass(w.category, PluginWarning)]
    assert "plugin 'fake_raising' (distribution fake-raising) failed in hook dcplan_register_strategies: " \
           "RuntimeError: registry exploded" in str(w.message)
    assert w.filename.endswith("fake_raising.py")  # not manager.py
    with pytest.raises(UnknownStrategyError, match="failed in hook dcplan_register_strategies"):
        pm.get_strategy("raising")
    with pytest.raises(PluginError, match="fake-raising.*failed in hook dcplan_register_strategies"):
        _ = DcplanPluginManager(env={"DCPLAN_STRICT_PLUGINS": "1"}).strategies


def test_two_distributions_with_one_entry_point_name(site):
    from dcplan.errors import PluginError
    from dcplan.manager import DcplanPluginManager

    make_dist(site, "fake-impostor", "fake_impostor", STRATEGY_SRC.format(name="impostor"), ep_name="lowest_rank")
    with pytest.raises(PluginError, match=r"'lowest_rank': dcplan-lowest-rank and fake-impostor"):
        DcplanPluginManager(env={})
    pm = DcplanPluginManager(env={"DCPLAN_DISABLE_PLUGINS": "fake-impostor"})
    assert "lowest_rank" in pm.strategy_names()


# ------------------------------------------------------------------ local plugins, no plugins
LOCAL = '''
import dcplan

def _mine(all_plans):
    return list(all_plans)

@dcplan.hookimpl
def dcplan_register_strategies():
    return [dcplan.Strategy(name="mine_local", func=_mine, description="a one-off local strategy")]
'''


def test_local_plugin_module_without_entry_point(tmp_path, monkeypatch):
    from dcplan.manager import DcplanPluginManager

    (tmp_path / "fake_local_strategy.py").write_text(LOCAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = DcplanPluginManager(env={"DCPLAN_PLUGINS": "fake_local_strategy"})
    assert pm.get_strategy("mine_local").description == "a one-off local strategy"
    assert pm.origin("fake_local_strategy") == "DCPLAN_PLUGINS"
    proc = _run("plugins", cwd=tmp_path, DCPLAN_PLUGINS="fake_local_strategy", PYTHONPATH=str(tmp_path))
    assert "strategy: mine_local" in proc.stdout
    with pytest.warns(RuntimeWarning, match="fake_missing_mod.*DCPLAN_PLUGINS.*ModuleNotFoundError"):
        DcplanPluginManager(env={"DCPLAN_PLUGINS": "fake_missing_mod"})
    sys.modules.pop("fake_local_strategy", None)


def test_core_alone_falls_back_to_the_torch_strategy():
    import dcplan
    from dcplan.errors import PluginWarning, UnknownStrategyError
    from dcplan.manager import DcplanPluginManager

    pm = DcplanPluginManager(env={}, entry_points=False)  # pip install dcplan, no plugin
    with pytest.warns(PluginWarning, match=r"default strategy 'size_balanced' is not installed; using the "
                                           r"built-in 'torch'.*dcplan-size-balanced"):
        planner = dcplan.SavePlanner(plugin_manager=pm)
    assert planner.strategy.name == "torch"
    with pytest.raises(UnknownStrategyError):  # asked for by name: an error, not a silent fallback
        dcplan.SavePlanner(plugin_manager=pm, strategy="size_balanced")


# ------------------------------------------------------------------ commands from plugins
COMMAND_SRC = '''
import dcplan

def _hello(args):
    import sys
    print("hello", args.who, "torch imported:", "torch" in sys.modules)
    return 0

@dcplan.hookimpl
def dcplan_register_commands(subparsers):
    p = subparsers.add_parser({name!r}, help="say hello")
    p.add_argument("who")
    p.set_defaults(func=_hello)
'''


def _cli_dist(site: Path, dist: str, module: str, command: str) -> None:
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(COMMAND_SRC.format(name=command))
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[dcplan.cli]\n{module} = {module}\n")


def test_a_plugin_adds_a_command_through_the_hook(tmp_path):
    site = tmp_path / "site"
    _cli_dist(site, "fake-hello", "fake_hello", "hello")
    proc = _run("hello", "world", cwd=tmp_path, PYTHONPATH=str(site))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello world torch imported: False"
    assert "say hello" in _run("--help", cwd=tmp_path, PYTHONPATH=str(site)).stdout
    data = json.loads(_run("plugins", "--json", cwd=tmp_path, PYTHONPATH=str(site)).stdout)
    assert data["commands"]["hello"] == "fake-hello"


def test_two_plugins_adding_one_command_is_an_error(tmp_path):
    site = tmp_path / "site"
    _cli_dist(site, "fake-convert", "fake_convert", "convert")
    proc = _run("--help", cwd=tmp_path, PYTHONPATH=str(site))
    assert proc.returncode == 2
    assert "the dcplan command 'convert' is added twice" in proc.stderr and "fake_convert" in proc.stderr
    assert "empty_load" in proc.stderr


def test_cli_warnings_are_one_line_and_point_at_the_plugin(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "fake-broken", "fake_broken", "raise ImportError('needs cuda_magic')\n")
    proc = _run("config", cwd=tmp_path, PYTHONPATH=str(site), DCPLAN_DISABLE_PLUGINS="lowst_rank")
    assert proc.returncode == 0
    lines = proc.stderr.splitlines()
    assert any(ln.startswith(f"{site / 'fake_broken.py'}:1: dcplan: warning: dcplan plugin 'fake_broken' "
                             "(distribution fake-broken) failed to load: ImportError: needs cuda_magic")
               for ln in lines), proc.stderr
    assert "dcplan: warning: DCPLAN_DISABLE_PLUGINS names 'lowst_rank', which matches no installed dcplan " \
           "plugin; did you mean 'lowest_rank'?" in proc.stderr
    assert "manager.py" not in proc.stderr
