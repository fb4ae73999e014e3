"""The CMake files: every Python file of the module is installed; extension metadata for the Extensions Index."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]
REPO_DIR = MODULE_DIR.parent


def test_extension_metadata():
    text = (REPO_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_CATEGORY "Registration")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(DeepAbdominalReg)" in text


def _module_python_files() -> set[str]:
    return {p.relative_to(MODULE_DIR).as_posix() for pattern in
            ("DeepAbdominalReg.py", "DeepAbdominalRegLib/*.py", "deepabdominalreg/**/*.py")
            for p in MODULE_DIR.glob(pattern)}


def test_module_python_scripts_list_names_every_python_file():
    """Without cmake: the MODULE_PYTHON_SCRIPTS block names exactly the module's Python files."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS\s+(.*?)\)", text, re.DOTALL)
    assert block, "no set(MODULE_PYTHON_SCRIPTS ...) block"
    assert set(block.group(1).split()) == _module_python_files()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_module_cmake_lists_every_python_file(tmp_path):
    """Configure the module's CMakeLists.txt with Slicer's macros replaced by recorders."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.16)
project(Check NONE)
set(BUILD_TESTING ON)
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  file(WRITE {tmp_path}/scripts.txt "${{M_SCRIPTS}}")
  file(WRITE {tmp_path}/resources.txt "${{M_RESOURCES}}")
endfunction()
function(slicer_add_python_unittest)
  file(WRITE {tmp_path}/unittest.txt "${{ARGN}}")
endfunction()
add_subdirectory({MODULE_DIR} module)
""")
    result = subprocess.run(["cmake", "-S", str(source), "-B", str(tmp_path / "build")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    scripts = set((tmp_path / "scripts.txt").read_text(encoding="utf-8").split(";"))
    assert scripts == _module_python_files()
    for resource in (tmp_path / "resources.txt").read_text(encoding="utf-8").split(";"):
        assert (MODULE_DIR / resource).is_file(), resource
    resources = (tmp_path / "resources.txt").read_text(encoding="utf-8")
    assert "Resources/UI/DeepAbdominalReg.ui" in resources
    weights = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "deepabdominalreg/nn/weights").glob("*.pt")}
    assert weights and weights <= set(resources.split(";")), "the shipped weights are installed with the module"
    assert (tmp_path / "unittest.txt").read_text(encoding="utf-8") == "SCRIPT;DeepAbdominalReg.py"
