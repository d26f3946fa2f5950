"""``dcplan plan``: synthetic workloads, every strategy, table / JSON / plot, without processes."""

from __future__ import annotations

import json
import sys

import pytest

from dcplan.cli.main import main


def test_table_has_torch_modes_and_every_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--layout", "ddp", "--model", "tiny", "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    for row in ("torch dedup_save_plans", "torch save_to_lowest_rank", "size_balanced", "size_balanced[mode=torch]",
                "split", "lowest_rank"):
        assert f"\n{row} " in out
    assert "bytes per rank with size_balanced:" in out
    assert "<- busiest" in out and "lower bound" in out


@pytest.mark.parametrize("layout,ranks", [("fsdp", 4), ("hsdp2", 4), ("tp2pp2dp2", None)])
def test_json_for_each_layout(capsys: pytest.CaptureFixture[str], layout: str, ranks: int | None) -> None:
    argv = ["plan", "--layout", layout, "--model", "tiny", "--json", "--per-rank", "--strategy", "split"]
    if ranks:
        argv += ["--ranks", str(ranks)]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 8 if layout.startswith("tp") else ranks
    rows = data["strategies"]
    assert rows["size_balanced"]["ratio"] <= rows["torch dedup_save_plans"]["ratio"] + 1e-9
    assert rows["split"]["ratio"] <= 1.01
    assert len(rows["split"]["bytes_per_rank"]) == data["world_size"]
    assert data["errors"] == {}


def test_bad_input_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--layout", "zero3", "--ranks", "4"]) == 2
    assert "tp<T>pp<P>dp<D>" in capsys.readouterr().err
    assert main(["plan", "--layout", "ddp"]) == 2
    assert "--ranks" in capsys.readouterr().err
    assert main(["plan", "--layout", "ddp", "--ranks", "2", "--model", "3b"]) == 2
    assert "70b" in capsys.readouterr().err
    assert main(["plan", "--layout", "hsdp3", "--ranks", "4", "--model", "tiny"]) == 2
    assert "multiple" in capsys.readouterr().err


def test_plot_needs_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plan", "--layout", "ddp", "--model", "tiny", "--ranks", "2", "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'dcplan[plot]'" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="the optional 'plot' extra (matplotlib) is not installed")
    out = tmp_path / "bytes.png"
    assert main(["plan", "--layout", "hsdp2", "--model", "tiny", "--ranks", "4", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
