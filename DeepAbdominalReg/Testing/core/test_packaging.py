"""What a wheel of the core carries: every subpackage and every data file the code looks up at run time (the shipped
weights and cards, the training configs), so an installed package works without the repository around it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "deepabdominalreg"
PYPROJECT = CORE.parents[1] / "pyproject.toml"


def _setuptools_table() -> dict:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_folder_of_the_core_with_python_files_is_a_package_the_wheel_includes():
    table = _setuptools_table()
    assert table["packages"]["find"]["include"] == ["deepabdominalreg", "deepabdominalreg.*"]
    for folder in {p.parent for p in CORE.rglob("*.py") if "__pycache__" not in p.parts}:
        assert (folder / "__init__.py").is_file(), f"{folder} has Python files but no __init__.py"


@pytest.mark.parametrize("package, folder", [("deepabdominalreg.nn", "nn/weights"),
                                             ("deepabdominalreg.training", "training/configs")])
def test_package_data_covers_every_data_file(package, folder):
    patterns = _setuptools_table()["package-data"][package]
    package_dir = CORE / package.split(".", 1)[1]
    covered = {p for pattern in patterns for p in package_dir.glob(pattern)}
    files = {p for p in (CORE / folder).iterdir() if p.is_file()}
    assert files, f"no data files in {folder}"
    assert files <= covered, f"not in the wheel: {sorted(p.name for p in files - covered)}"


def test_models_are_found_in_the_package_not_the_repository(monkeypatch):
    from deepabdominalreg.nn.models import available_models, models_directory

    monkeypatch.delenv("DEEPABDOMINALREG_MODELS", raising=False)
    assert models_directory() == CORE / "nn" / "weights"
    assert {"abdomen-ct-4mm-v2", "abdomen-ct-4mm-v3"} <= set(available_models())
