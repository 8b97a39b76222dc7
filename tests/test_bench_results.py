"""bench/common.write_results: DESIGN.md's one results shape, runs in parts, and where each row was measured."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def common(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    monkeypatch.setattr(mod, "device_name", lambda device: f"dev-{device}")
    return mod


def row(method, value):
    return {"model": "m", "method": method, "setting": "s", "metric": "top1", "value": value, "seconds": 1.0}


def test_runs_in_parts_keep_each_rows_commit_and_device(common, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_GIT", "aaa")
    common.write_results("b", "cpu", [row("x", 1), row("y", 2)], notes=["first"])
    doc = json.loads((tmp_path / "b.json").read_text())
    assert set(doc) == {"bench", "date", "device", "git", "rows", "notes"} and doc["git"] == "aaa"
    assert all(r["git"] == "aaa" and r["device"] == "dev-cpu" for r in doc["rows"])
    assert (tmp_path / "b.md").read_text().splitlines()[2].endswith("device dev-cpu; commit aaa")
    monkeypatch.setenv("SLIMKIT_GIT", "bbb")
    common.write_results("b", "cuda", [row("y", 3), row("z", 4)], notes=["second"], append=True)
    doc = json.loads((tmp_path / "b.json").read_text())
    assert [(r["method"], r["value"], r["git"], r["device"]) for r in doc["rows"]] == [
        ("x", 1, "aaa", "dev-cpu"), ("y", 3, "bbb", "dev-cuda"), ("z", 4, "bbb", "dev-cuda")]
    assert doc["notes"] == ["first"] and doc["git"] == "bbb"       # notes written after reading the rows stay
    header = (tmp_path / "b.md").read_text().splitlines()[2]
    assert "device dev-cpu (1 rows), dev-cuda (2 rows)" in header and "commit aaa (1 rows), bbb (2 rows)" in header
