"""scripts/reproduce.py: step order, and a step reruns only when its inputs change."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from calm_utils.utils import REPO_ROOT


@pytest.fixture()
def rep(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "STAMPS", tmp_path / "stamps")
    return mod


def test_step_order(rep):
    ids = [s[0] for s in rep.steps(smoke=True)]
    assert ids[:4] == ["01", "02", "03", "05"] and ids[-1] == "04"      # tables first, figures last
    assert [i for i in ids if i.startswith("bench_")] == ["bench_t5_calm", "bench_smollm2-135m"]


def test_unchanged_inputs_are_skipped(rep, monkeypatch, capsys):
    calls, inputs = [], {"a": [b"v1"]}
    monkeypatch.setattr(rep, "steps", lambda smoke: [("a", "step a", lambda: list(inputs["a"]), lambda: calls.append("a"))])
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--smoke"])
    rep.main()
    rep.main()                                   # nothing changed: skipped
    assert calls == ["a"]
    inputs["a"] = [b"v2"]                        # an input changed: rerun
    rep.main()
    assert calls == ["a", "a"]
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--smoke", "--force"])
    rep.main()
    assert calls == ["a", "a", "a"]
    stamp = json.loads((rep.STAMPS / "a_smoke.json").read_text())
    assert {"inputs", "date", "seconds"} <= set(stamp)
    assert "up to date" in capsys.readouterr().out
