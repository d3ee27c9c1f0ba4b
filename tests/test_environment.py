"""environment.yml and pyproject.toml must pin the same packages; the set-up must pin torch."""
from __future__ import annotations

import re
import tomllib

from calm_utils.utils import REPO_ROOT


def _pyproject_pins() -> set[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def _conda_pins() -> tuple[str | None, set[str]]:
    text = (REPO_ROOT / "environment.yml").read_text()
    python = re.search(r"^\s*-\s*python=(\S+)", text, re.M)
    pip = set(re.findall(r"^\s{6}-\s*(\S+==\S+)\s*$", text, re.M))
    return (python.group(1) if python else None), pip


def test_environment_yml_matches_pyproject():
    python, pip = _conda_pins()
    assert python == "3.11"
    assert pip == _pyproject_pins()


def test_every_dependency_is_pinned():
    assert all("==" in dep for dep in _pyproject_pins())


def test_setup_installs_cpu_torch_explicitly():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "pip install -q torch==2.13.0" in makefile
    assert "torch==2.13.0" in _pyproject_pins()
    assert (REPO_ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_study_model_is_one_parameter(monkeypatch, tmp_path):
    from calm_utils import plotting
    from calm_utils.utils import DEFAULT_MODEL, model_slug, scale_layer, study_model
    monkeypatch.delenv("CALM_MODEL", raising=False)
    monkeypatch.setenv("CALM_SMOKE", "0")
    assert study_model() == DEFAULT_MODEL and plotting.figures_dir() == plotting.FIGURES
    monkeypatch.setenv("CALM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    assert study_model() == "Qwen/Qwen2.5-0.5B-Instruct" and model_slug(study_model()) == "qwen2.5-0.5b-instruct"
    monkeypatch.setattr(plotting, "FIGURES", tmp_path)
    assert plotting.figures_dir() == tmp_path / "qwen2.5-0.5b-instruct"   # never overwrites the study's tables
    assert [scale_layer(n, 30) for n in (1, 16, 22, 30)] == [1, 16, 22, 30]
    assert scale_layer(22, 24) == 18 and scale_layer(1, 12) == 1 and scale_layer(40, 30) == 30
