"""*Reload*: the core and the Lib are reloaded, each module after the modules it imports."""

import subprocess
import sys
import textwrap
from pathlib import Path

from DeepAbdominalRegLib import reloading
from test_cmake import _module_python_files

MODULE_DIR = Path(__file__).resolve().parents[2]

# two tiny packages with the real packages' names: a chain of 'from X import name' through a subpackage, a
# 'from package import submodule', imports inside a function and under TYPE_CHECKING (which form no cycle)
PACKAGES = {
    "deepabdominalreg/__init__.py": "",
    "deepabdominalreg/base.py": "VALUE = 1\n",
    "deepabdominalreg/mid.py": "from deepabdominalreg.base import VALUE\nDOUBLE = 2 * VALUE\n",
    "deepabdominalreg/sub/__init__.py": "from deepabdominalreg.sub.leaf import LEAF\n",
    "deepabdominalreg/sub/leaf.py": "from deepabdominalreg import mid\nLEAF = mid.DOUBLE + 1\n",
    "deepabdominalreg/unused.py": "raise RuntimeError('never imported')\n",
    "deepabdominalreg/__main__.py": "raise SystemExit('a script')\n",
    "DeepAbdominalRegLib/__init__.py": "",
    "DeepAbdominalRegLib/glue.py": textwrap.dedent("""
        from typing import TYPE_CHECKING
        from deepabdominalreg.sub import LEAF
        if TYPE_CHECKING:
            from DeepAbdominalRegLib.late import LATE
        def late():
            from DeepAbdominalRegLib.late import LATE
            return LATE
    """),
    "DeepAbdominalRegLib/late.py": "from DeepAbdominalRegLib.glue import LEAF\nLATE = LEAF * 10\n",
}


def _write(root: Path) -> None:
    for name, text in PACKAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_module_imports_and_order(tmp_path):
    _write(tmp_path)
    imports = reloading.moduleImports(tmp_path)
    assert imports["deepabdominalreg.sub.leaf"] == {"deepabdominalreg.mid"}
    assert imports["deepabdominalreg.sub"] == {"deepabdominalreg.sub.leaf"}
    assert imports["DeepAbdominalRegLib.glue"] == {"deepabdominalreg.sub"}
    assert imports["DeepAbdominalRegLib.late"] == {"DeepAbdominalRegLib.glue"}
    assert "deepabdominalreg.__main__" not in imports
    order = reloading.reloadOrder(tmp_path)
    assert order.index("deepabdominalreg.base") < order.index("deepabdominalreg.mid") < order.index(
        "deepabdominalreg.sub.leaf") < order.index("deepabdominalreg.sub") < order.index("DeepAbdominalRegLib.glue")


def test_reload_passes_an_edit_through_every_importer(tmp_path):
    """In a fresh interpreter: import the packages, edit the deepest module, reload: the edit reaches the Lib."""
    _write(tmp_path)
    script = textwrap.dedent(f"""
        import importlib.util, pathlib, sys
        sys.path.insert(0, {str(tmp_path)!r})
        spec = importlib.util.spec_from_file_location("reloading", {str(MODULE_DIR / "DeepAbdominalRegLib" /
                                                                         "reloading.py")!r})
        reloading = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reloading)
        import DeepAbdominalRegLib.glue as glue
        assert glue.LEAF == 3 and glue.late() == 30
        pathlib.Path({str(tmp_path / "deepabdominalreg" / "base.py")!r}).write_text("VALUE = 10\\n")
        reloaded = reloading.reloadPackages(pathlib.Path({str(tmp_path)!r}))
        assert "deepabdominalreg.unused" not in sys.modules and "deepabdominalreg.unused" not in reloaded
        assert "DeepAbdominalRegLib.late" in reloaded
        assert glue.LEAF == 21, glue.LEAF
        assert sys.modules["DeepAbdominalRegLib.late"].LATE == 210 and glue.late() == 210
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-B", "-c", script], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_real_order_covers_every_installed_module_after_its_imports():
    imports = reloading.moduleImports()
    order = reloading.reloadOrder()
    installed = {name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                 for name in _module_python_files() if name != "DeepAbdominalReg.py"}
    assert set(order) == installed - {"deepabdominalreg.__main__"} and len(order) == len(set(order))
    position = {name: index for index, name in enumerate(order)}
    for name, imported in imports.items():
        assert all(position[dependency] < position[name] for dependency in imported), name
    assert imports["DeepAbdominalRegLib.task"] >= {"DeepAbdominalRegLib.process", "DeepAbdominalRegLib.nodes"}
    assert "DeepAbdominalRegLib.nodes" not in imports["DeepAbdominalRegLib.process"]  # TYPE_CHECKING only
