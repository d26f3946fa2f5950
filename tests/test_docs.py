"""The docs cannot drift from the code.

* the quickstart's and the configuration page's python blocks run as written;
* the plugin guide's files are written to a folder, registered like an installed
  distribution, and their tests pass (conformance kit included);
* the generated reference tables (config keys, CLI help, hooks, strategies) match
  what ``docs/_gen.py`` produces from the current code;
* every hook spec has a complete docstring, is documented, and some test uses it.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import tomllib
from pathlib import Path

import pytest

import dcplan
from dcplan.manager import reset_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def _gen():
    spec = importlib.util.spec_from_file_location("dcplan_docs_gen", DOCS / "_gen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def blocks(page: str, lang: str) -> list[str]:
    """Fenced code blocks of a docs page in one language, in order."""
    return [body for kind, body in FENCE.findall((DOCS / page).read_text()) if kind == lang]


def file_blocks(page: str) -> dict[str, str]:
    """Blocks whose first line is ``# file: <path>``: the files a page tells you to write."""
    out = {}
    for kind, body in FENCE.findall((DOCS / page).read_text()):
        first, _, rest = body.partition("\n")
        if kind in ("python", "toml") and first.startswith("# file: "):
            out[first.removeprefix("# file: ").strip()] = rest
    return out


@pytest.mark.parametrize("page", ["quickstart.md", "configuration.md"])
def test_python_blocks_run(page):
    code = blocks(page, "python")
    assert code, f"no python blocks in {page}"
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    for block in code:
        exec(compile(block, f"docs/{page}", "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("page", ["quickstart.md", "configuration.md", "writing-a-plugin.md"])
def test_toml_blocks_parse(page):
    for body in blocks(page, "toml"):
        tomllib.loads(body)


@pytest.mark.parametrize("page", ["quickstart.md", "configuration.md"])
def test_config_examples_are_valid_config(page):
    """The dcplan.toml / [tool.dcplan] examples use real keys and valid values."""
    from dcplan.config import Config

    found = 0
    for body in blocks(page, "toml"):
        data = tomllib.loads(body)
        data = data.get("tool", {}).get("dcplan", data)
        Config(**data)
        found += 1
    assert found


def test_plugin_guide_is_a_working_package(tmp_path, monkeypatch):
    files = file_blocks("writing-a-plugin.md")
    assert {"pyproject.toml", "src/dcplan_highest_rank/__init__.py", "tests/test_highest_rank.py"} <= set(files)
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    project = tomllib.loads(files["pyproject.toml"])["project"]
    eps = project["entry-points"]["dcplan"]
    for target in eps.values():
        assert (tmp_path / "src" / target).is_dir(), f"entry point {target!r} names no package under src/"
    # what `pip install -e .` would record: the distribution and its entry points
    dist = tmp_path / "src" / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (dist / "entry_points.txt").write_text("[dcplan]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    # run the guide's tests as its author would (`pytest`), in this process to reuse torch and the kit's workers
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    reset_plugin_manager()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--dcplan-max-examples", "50", str(tmp_path / "tests")])
    assert code == 0, "the plugin guide's tests failed (output above)"
    assert "highest_rank" in dcplan.get_plugin_manager().strategy_names()


# ------------------------------------------------------------------ generated reference
@pytest.mark.parametrize("name", ["config.md", "hooks.md", "cli.md", "strategies.md"])
def test_generated_reference_is_current(name):
    gen = _gen()
    if name == "cli.md" and sys.version_info[:2] != (3, 11):
        pytest.skip("argparse's help layout differs between Python versions; docs/_generated/cli.md is from 3.11")
    if name == "strategies.md":
        import importlib.metadata as md

        missing = []
        for dist in gen.repo_distributions():
            try:
                md.version(dist)
            except md.PackageNotFoundError:
                missing.append(dist)
        if missing:
            pytest.skip(f"in-repo plugins not installed here: {', '.join(missing)}")
    expected = gen.GENERATORS[name]()
    current = (DOCS / "_generated" / name).read_text()
    assert current == expected, f"docs/_generated/{name} is stale: run `python docs/_gen.py` and commit it"


def test_pages_include_the_generated_tables():
    for page, name in [
        ("configuration.md", "config.md"),
        ("cli.md", "cli.md"),
        ("hooks.md", "hooks.md"),
        ("concepts.md", "hooks.md"),
        ("strategies.md", "strategies.md"),
        ("strategies.md", "demo-report.md"),
        ("strategies.md", "plan-report.md"),
    ]:
        assert f"{{include}} _generated/{name}" in (DOCS / page).read_text(), (page, name)


def test_every_config_key_is_documented():
    import attrs

    from dcplan.config import Config

    table = (DOCS / "_generated" / "config.md").read_text()
    for field in attrs.fields(Config):
        assert f"| `{field.name}` | `DCPLAN_{field.name.upper()}` |" in table, field.name


def test_demo_report_covers_every_strategy():
    gen = _gen()
    report = (DOCS / "_generated" / "demo-report.md").read_text()
    strategies = (DOCS / "_generated" / "strategies.md").read_text()
    names = re.findall(r"^\| `(\w+)` \|", strategies, re.M)
    assert names
    for name in names:
        assert f"`{name}`" in report, f"demo-report.md lacks {name}: run `python docs/_gen.py --demo`"
    assert "every checkpoint reloaded bit-exact" in report
    assert callable(gen.demo_report_md)


@pytest.mark.slow
def test_demo_report_is_current():
    import torch

    report = (DOCS / "_generated" / "demo-report.md").read_text()
    version = torch.__version__.split("+")[0]
    if f"torch {version};" not in report:
        pytest.skip(f"docs/_generated/demo-report.md was generated with another torch than {version}")
    gen = _gen()
    assert gen.demo_report_md() == report, "stale: run `python docs/_gen.py --demo` and commit it"
    plans = (DOCS / "_generated" / "plan-report.md").read_text()
    assert gen.plan_report_md() == plans, "stale: run `python docs/_gen.py --demo` and commit it"


# ------------------------------------------------------------------ hooks
def _hooks():
    from dcplan import hookspecs

    return [(n, f) for n, f in vars(hookspecs).items() if n.startswith("dcplan_") and inspect.isfunction(f)]


def test_every_hook_spec_docstring_is_complete():
    problems = []
    for name, func in _hooks():
        doc = inspect.getdoc(func) or ""
        for section in (":returns:", ":runs on:", ":results:"):
            if section not in doc:
                problems.append(f"{name}: no {section} section")
        for param in inspect.signature(func).parameters:
            if f":param {param}:" not in doc:
                problems.append(f"{name}: parameter {param!r} is not described (:param {param}:)")
        if not doc.split("\n", 1)[0].strip():
            problems.append(f"{name}: no summary line")
    assert not problems, "\n".join(problems)


def test_every_hook_is_documented():
    hooks_page = (DOCS / "hooks.md").read_text()
    table = (DOCS / "_generated" / "hooks.md").read_text()
    concepts = (DOCS / "concepts.md").read_text()
    gen = _gen()
    for name, _ in _hooks():
        assert f"{{autodoc2-object}} dcplan.hookspecs.{name}" in hooks_page, f"docs/hooks.md does not render {name}"
        assert f"<hook-{name}>" in table, f"regenerate docs/_generated/hooks.md ({name})"
        assert f"(hook-{name})=" in hooks_page, f"docs/hooks.md lacks the in-page target of {name}"
        assert f"| `{name}` |" in concepts, f"docs/concepts.md's 'may change' table lacks {name}"
        assert name in gen.SIDES, f"docs/_gen.py SIDES lacks {name}"


def test_every_hook_has_a_test():
    """Each hook name occurs in some test (implemented by a test plugin, or called), this file aside."""
    sources = []
    for base in [ROOT / "tests", *ROOT.glob("plugins/*/tests"), *ROOT.glob("examples/*/tests")]:
        for path in base.rglob("*.py"):
            if not path.name.startswith("test_docs"):
                sources.append(path.read_text())
    text = "\n".join(sources)
    untested = [name for name, _ in _hooks() if not re.search(rf"\b{name}\b", text)]
    assert not untested, f"hooks no test uses: {', '.join(untested)}"


# ------------------------------------------------------------------ what a new user stumbled on (issue 18)
def test_theme_has_room_for_wide_tables():
    conf = (DOCS / "conf.py").read_text()
    assert 'html_theme = "furo"' in conf and '"custom.css"' in conf
    assert "furo" in (DOCS / "requirements.txt").read_text()
    tox = (ROOT / "tox.ini").read_text()
    docs_env = tox.split("[testenv:docs]")[1].split("\n[")[0]
    assert "furo" in docs_env
    assert ".content" in (DOCS / "_static" / "custom.css").read_text()


def test_strategy_options_are_shown_as_toml():
    table = (DOCS / "_generated" / "strategies.md").read_text()
    assert 'mode = "balanced"' in table and "save_to_lowest_rank = false" in table
    assert "'balanced'" not in table and "False" not in table


def test_install_commands_work_from_a_clone():
    """Nothing is on the package index: every `pip install` the user pages show names a local path."""
    for page in ["quickstart.md", "strategies.md", "configuration.md", "cli.md", "writing-a-plugin.md"]:
        for line in (DOCS / page).read_text().splitlines():
            if line.lstrip().startswith("$") and "pip install" in line and "build twine" not in line:
                assert "./" in line or "-e ." in line or '-e ".[' in line, (page, line)
    readme = (ROOT / "README.md").read_text()
    assert "pip install ./ ./plugins/size_balanced" in readme


def test_quickstart_pyproject_snippet_has_its_table_header():
    for body in blocks("quickstart.md", "toml"):
        if "pyproject.toml" in body.splitlines()[0]:
            assert "[tool.dcplan]" in body
            break
    else:
        raise AssertionError("the quickstart has no pyproject.toml snippet")


def test_strategies_page_shows_how_to_select_one():
    text = (DOCS / "strategies.md").read_text()
    assert "## Select a strategy" in text
    snippet = blocks("strategies.md", "toml")[0]
    data = tomllib.loads(snippet)["tool"]["dcplan"]
    from dcplan.config import Config

    Config(**data)
    assert "DCPLAN_STRATEGY=" in text and "SavePlanner(strategy=" in text


def test_local_plugin_route_is_documented():
    text = (DOCS / "configuration.md").read_text()
    assert "## Local plugins" in text and "DCPLAN_PLUGINS=my_strategy" in text and "plugin_manager=pm" in text
    assert "built-in `torch` strategy" in text  # what the core alone does
