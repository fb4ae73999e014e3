"""Headless MRML tests on PyPI's slicer-core (real MRML, no Slicer application, no Qt)."""

import os
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("slicer_core")  # PyPI also has an unrelated package called "slicer"

MODULE_DIR = Path(__file__).resolve().parents[2]  # DeepAbdominalReg/ (module file, DeepAbdominalRegLib, core)
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer


@pytest.fixture
def scene():
    """A fresh scene, also set as ``slicer.mrmlScene`` for the ``slicer.util`` helpers that use it."""
    previous = getattr(slicer, "mrmlScene", None)
    mrmlScene = slicer.vtkMRMLScene()
    slicer.mrmlScene = mrmlScene
    yield mrmlScene
    mrmlScene.Clear(1)
    slicer.mrmlScene = previous


def nodeCount(scene) -> int:
    return scene.GetNumberOfNodes()


@pytest.fixture
def fakeInterpreter(tmp_path):
    """An executable standing in for PythonSlicer: records its command line and the config file it points at,
    parses them with the core CLI's own parser, and fails like the CLI (``error: ...`` on stderr)."""
    if os.name == "nt":
        pytest.skip("POSIX shebang script")
    capture = tmp_path / "capture.json"
    script = tmp_path / "PythonSlicer"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import json, os, sys
        from deepabdominalreg.cli import _build_config, build_parser
        argv = sys.argv[1:]
        args = build_parser().parse_args(argv[2:])
        record = {{"argv": argv, "configFile": json.loads(open(args.config).read()),
                  "parsed": _build_config(args).to_dict(), "inputs": sorted(os.listdir(os.path.dirname(args.fixed)))}}
        open({str(capture)!r}, "w").write(json.dumps(record))
        print("error: recorded the command line", file=sys.stderr)
        sys.exit(2)
    """))
    script.chmod(0o755)
    return script, capture
