"""First-run dependencies: versions checked from metadata, one confirmation, one install at a time, none in tests.

Slicer's application parts are faked here: ``slicer.app`` (testing flag, processEvents), the confirmation dialog,
``slicer.packaging.pip_ensure`` (Slicer >= 5.11) and SlicerPyTorch's ``PyTorchUtils``; installed versions come from a
patched ``importlib.metadata.version``.  The Slicer < 5.11 path runs a real ``python -m pip``-like subprocess.
"""

import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import types
import unittest
from pathlib import Path

import pytest
import slicer
from DeepAbdominalRegLib import dependencies as deps
from DeepAbdominalRegLib import task
from slicer_app_stubs import slicerApplicationStubs

MODULE_DIR = Path(__file__).resolve().parents[2]
REPO_DIR = MODULE_DIR.parent

CURRENT = {"torch": "2.13.0+cpu", "SimpleITK": "2.5.0", "numpy": "2.1.0", "scipy": "1.14.0", "scikit-image": "0.24.0"}


class FakeApp:
    def __init__(self, testing=False):
        self.testing = testing
        self.events = 0

    def testingEnabled(self):
        return self.testing

    def processEvents(self):
        self.events += 1

    def setOverrideCursor(self, cursor):  # slicer.util.tryWithErrorDisplay(waitCursor=True)
        pass

    def restoreOverrideCursor(self):
        pass


class Recorder:
    """The fake Slicer: versions, confirmations, pip_ensure and PyTorchUtils calls."""

    def __init__(self, monkeypatch, versions, *, testing=False, confirm=True, packaging=True, pyTorchUtils=False):
        self.versions = dict(versions)
        self.confirmations, self.pipEnsureCalls, self.torchCalls = [], [], []
        self.duringInstall = None  # called inside an install (a second click delivered by processEvents)
        self.app = FakeApp(testing)
        monkeypatch.setattr(importlib.metadata, "version", self.version)
        monkeypatch.setattr(slicer, "app", self.app, raising=False)
        monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", self.confirm, raising=False)
        self.confirmAnswer = confirm
        if packaging:
            module = types.ModuleType("slicer.packaging")
            module.pip_ensure = self.pipEnsure
            monkeypatch.setitem(sys.modules, "slicer.packaging", module)
            monkeypatch.setattr(slicer, "packaging", module, raising=False)
        else:
            monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # import fails, as before Slicer 5.11
        if pyTorchUtils:
            module = types.ModuleType("PyTorchUtils")
            recorder = self

            class PyTorchUtilsLogic:
                def installTorch(self, askConfirmation=False, forceComputationBackend=None,
                                 torchVersionRequirement=None, torchvisionVersionRequirement=None):
                    recorder.torchCalls.append({"askConfirmation": askConfirmation,
                                                "torchVersionRequirement": torchVersionRequirement})
                    recorder.versions["torch"] = "2.5.1+cu121"
                    return types.ModuleType("torch")

            module.PyTorchUtilsLogic = PyTorchUtilsLogic
            monkeypatch.setitem(sys.modules, "PyTorchUtils", module)
        else:
            monkeypatch.setitem(sys.modules, "PyTorchUtils", None)

    def version(self, distribution):
        value = self.versions.get(distribution)
        if value is None:
            raise importlib.metadata.PackageNotFoundError(distribution)
        return value

    def confirm(self, text, windowTitle=None, **kwargs):
        self.confirmations.append(text)
        return self.confirmAnswer

    def pipEnsure(self, requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                  requester=None, skip_in_testing=True, show_progress=True):
        self.pipEnsureCalls.append({"requirements": list(requirements), "prompt_install": prompt_install,
                                    "requester": requester})
        if self.duringInstall is not None:
            self.duringInstall()
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
            self.versions[name] = CURRENT.get(name, "99.0")


@pytest.fixture(autouse=True)
def noInstallLeftRunning():
    yield
    deps._installing = False


def _pyprojectDependencies() -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads((REPO_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(deps._splitRequirement(item) for item in data["project"]["dependencies"])


def test_requirements_are_pyprojects_minus_what_the_run_does_not_need():
    pyproject = _pyprojectDependencies()
    module = dict(deps._splitRequirement(item) for item in deps.REQUIREMENTS.values())
    assert set(deps.NOT_NEEDED_BY_RUN) <= set(pyproject)
    assert module == {name: spec for name, spec in pyproject.items() if name not in deps.NOT_NEEDED_BY_RUN}


def test_the_modules_run_imports_scikit_image_and_not_matplotlib(tmp_path):
    """The exact command the panel runs (``--no-report``) on two small volumes, with matplotlib made unimportable:
    it succeeds, and it imported skimage (so scikit-image is required and matplotlib is not)."""
    from deepabdominalreg.config import config_from_preset
    from DeepAbdominalRegLib import process
    from test_end_to_end import _blob

    core = process.CoreInputs(fixed=_blob(), moving=_blob((5.0, 0.0, 0.0)))
    paths = process.writeCoreInputs(core, tmp_path)
    configPath = process.writeConfig(config_from_preset("fast", working_spacing_mm=5.0, device="cpu", seed=0),
                                     tmp_path / "config.json")
    command = process.registerCommand(paths, tmp_path / "out", configPath, python=sys.executable)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    record = tmp_path / "modules.json"
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import atexit, json, sys

        class BlockMatplotlib:
            def find_spec(self, name, path=None, target=None):
                if name == "matplotlib" or name.startswith("matplotlib."):
                    raise ImportError("matplotlib blocked by test_dependencies")
                return None

        sys.meta_path.insert(0, BlockMatplotlib())
        atexit.register(lambda: open({str(record)!r}, "w").write(json.dumps(sorted(sys.modules))))
    """), encoding="utf-8")
    env = process.subprocessEnvironment()
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), env["PYTHONPATH"]])
    result = subprocess.run(command, cwd=MODULE_DIR, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = set(json.loads(record.read_text(encoding="utf-8")))
    assert "skimage" in modules and "scipy" in modules and "torch" in modules
    assert not any(name.split(".")[0] == "matplotlib" for name in modules)


@pytest.mark.parametrize("withPackaging", [True, False], ids=["packaging", "plain-fallback"])
def test_an_outdated_version_counts_as_missing(monkeypatch, withPackaging):
    Recorder(monkeypatch, {**CURRENT, "torch": "1.13.1+cu117", "scipy": "1.9.3", "scikit-image": None})
    if not withPackaging:
        monkeypatch.setattr(deps, "_packagingRequirementClass", lambda: None)
    unsatisfied = {item.importName: item.installed for item in deps.unsatisfiedRequirements()}
    assert unsatisfied == {"torch": "1.13.1+cu117", "scipy": "1.9.3", "skimage": None}
    assert deps.missingRequirements() == ["torch", "scipy", "skimage"]


def test_current_local_and_prerelease_builds_are_accepted(monkeypatch):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": "2.6.0.dev20241112+cu124"})
    assert deps.unsatisfiedRequirements() == []
    recorder.versions["numpy"] = "1.23.5"
    assert deps.missingRequirements() == ["numpy"]


def test_one_confirmation_then_slicer_packaging_without_its_own_prompt(monkeypatch):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": None, "scipy": "1.9.0"})
    statuses = []
    deps.ensureDependencies(askConfirmation=True, onStatus=statuses.append)
    assert len(recorder.confirmations) == 1
    assert "torch>=2.1 (not installed)" in recorder.confirmations[0]
    assert "scipy>=1.10 (1.9.0 installed)" in recorder.confirmations[0]
    assert recorder.pipEnsureCalls == [{"requirements": ["torch>=2.1", "scipy>=1.10"], "prompt_install": False,
                                        "requester": "DeepAbdominalReg"}]
    assert statuses[0] == deps.INSTALLING_TEXT == "Installing PyTorch and dependencies…"
    assert not deps.isInstalling()


def test_torch_through_pytorchutils_without_a_second_confirmation(monkeypatch):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": "2.0.1", "scikit-image": None}, pyTorchUtils=True)
    deps.ensureDependencies(askConfirmation=True)
    assert len(recorder.confirmations) == 1
    assert recorder.torchCalls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]
    assert [call["requirements"] for call in recorder.pipEnsureCalls] == [["scikit-image>=0.21"]]
    assert deps.unsatisfiedRequirements() == []


def test_declined_raises_and_installs_nothing(monkeypatch):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": None}, confirm=False, pyTorchUtils=True)
    with pytest.raises(deps.DependencyError, match="declined"):
        deps.ensureDependencies(askConfirmation=True)
    assert len(recorder.confirmations) == 1
    assert recorder.pipEnsureCalls == [] and recorder.torchCalls == []
    assert recorder.versions["torch"] is None and not deps.isInstalling()


def test_a_second_call_during_an_install_does_not_install_again(monkeypatch):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": None})
    seen = []

    def secondClick():
        seen.append(deps.isInstalling())
        with pytest.raises(deps.DependencyError, match="being installed"):
            deps.ensureDependencies(askConfirmation=True)

    recorder.duringInstall = secondClick
    deps.ensureDependencies(askConfirmation=True)
    assert seen == [True]
    assert len(recorder.pipEnsureCalls) == 1 and len(recorder.confirmations) == 1
    assert not deps.isInstalling()


@pytest.fixture
def module(scene):
    with slicerApplicationStubs():
        yield importlib.import_module("DeepAbdominalReg")


class _Label:
    text = ""


def _widget(module):
    """The widget with only what onApplyButton touches (the real one needs Qt and the .ui)."""
    widget = module.DeepAbdominalRegWidget.__new__(module.DeepAbdominalRegWidget)
    widget._job = None
    widget._parameterNode = object()
    widget.ui = types.SimpleNamespace(statusLabel=_Label(), progressBar=types.SimpleNamespace(value=-1),
                                      deviceInfoLabel=_Label(), logTextEdit=types.SimpleNamespace(clear=lambda: None))
    widget.guiUpdates = []
    widget.updateGuiFromParameterNode = lambda: widget.guiUpdates.append(widget._installingDependencies)
    widget.starts = []

    def registerUsingParameterNode(parameterNode, **kwargs):
        widget.starts.append(parameterNode)
        return JOB

    widget.logic = types.SimpleNamespace(registerUsingParameterNode=registerUsingParameterNode)
    return widget


JOB = types.SimpleNamespace(inputs=task.InputNodes(None, None))  # a started job (no inputs under a transform)


def test_a_second_register_click_during_the_install_starts_nothing(monkeypatch, module):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": None})
    monkeypatch.setattr(sys.modules["qt"], "Qt", types.SimpleNamespace(WaitCursor=3), raising=False)
    widget = _widget(module)
    during = {}

    def secondClick():
        during["status"] = widget.ui.statusLabel.text
        during["installing"] = widget._installingDependencies
        widget.onApplyButton()  # delivered by the processEvents of pip's output loop
        during["starts"] = len(widget.starts)

    recorder.duringInstall = secondClick
    widget.onApplyButton()
    assert during == {"status": "Installing PyTorch and dependencies…", "installing": True, "starts": 0}
    assert len(recorder.pipEnsureCalls) == 1 and len(recorder.confirmations) == 1
    assert widget.starts == [widget._parameterNode] and widget._job is JOB
    assert widget.guiUpdates[0] is True and widget.guiUpdates[-1] is False  # Register disabled, then enabled
    assert widget.ui.deviceInfoLabel.text.startswith("PyTorch 2.13.0+cpu installed")


def test_testing_mode_installs_nothing(monkeypatch):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": None}, testing=True, pyTorchUtils=True)
    with pytest.raises(deps.DependencyError, match="Testing mode"):
        deps.ensureDependencies(askConfirmation=False)
    assert recorder.confirmations == [] and recorder.pipEnsureCalls == [] and recorder.torchCalls == []


def test_the_self_test_skips_when_torch_is_absent(monkeypatch, module):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": None}, testing=True)
    result = unittest.TestResult()
    module.DeepAbdominalRegTest("test_RegisterPhantomInProcess").run(result)  # as slicer.testing.runUnitTest does
    assert result.errors == [] and result.failures == []
    assert len(result.skipped) == 1 and "torch>=2.1 (not installed)" in result.skipped[0][1]
    assert result.wasSuccessful()
    module.DeepAbdominalRegTest().runTest()  # "Reload and Test": returns with the reason shown, no exception
    assert recorder.pipEnsureCalls == [] and recorder.confirmations == []


def test_without_the_slicer_application_it_names_the_pip_command(monkeypatch):
    recorder = Recorder(monkeypatch, {**CURRENT, "scipy": None})
    monkeypatch.setattr(slicer, "app", None)
    with pytest.raises(deps.DependencyError, match=r"PythonSlicer -m pip install scipy>=1\.10"):
        deps.ensureDependencies(askConfirmation=True)
    assert recorder.pipEnsureCalls == []


def _fakePip(tmp_path, exitCode):
    """A stand-in for ``PythonSlicer -m pip install``: prints pip-like lines, marks the install done."""
    if os.name == "nt":
        pytest.skip("POSIX shebang script")
    marker = tmp_path / "installed"
    script = tmp_path / "PythonSlicer"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import sys
        print("args:", " ".join(sys.argv[1:]))
        print("Collecting scipy>=1.10")
        print("Successfully installed scipy-1.14.0" if {exitCode} == 0 else "ERROR: No matching distribution")
        if {exitCode} == 0:
            open({str(marker)!r}, "w").write("done")
        sys.exit({exitCode})
    """), encoding="utf-8")
    script.chmod(0o755)
    return script, marker


def test_before_slicer_5_11_pips_lines_reach_the_status(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch, {**CURRENT, "scipy": None}, packaging=False)
    script, marker = _fakePip(tmp_path, 0)
    monkeypatch.setattr(deps, "_pythonSlicer", lambda: str(script))
    realVersion = recorder.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "1.14.0" if name == "scipy" and marker.exists() else realVersion(name))
    statuses = []
    deps.ensureDependencies(askConfirmation=True, onStatus=statuses.append)
    assert statuses[0] == deps.INSTALLING_TEXT
    assert "args: -m pip install scipy>=1.10" in statuses and "Successfully installed scipy-1.14.0" in statuses
    assert recorder.app.events >= 3 and len(recorder.confirmations) == 1


def test_a_failed_pip_raises_with_its_last_lines(monkeypatch, tmp_path):
    Recorder(monkeypatch, {**CURRENT, "scipy": None}, packaging=False)
    script, marker = _fakePip(tmp_path, 1)
    monkeypatch.setattr(deps, "_pythonSlicer", lambda: str(script))
    with pytest.raises(deps.DependencyError, match="No matching distribution"):
        deps.ensureDependencies(askConfirmation=True)
    assert not marker.exists() and not deps.isInstalling()


def test_describe_devices_reads_metadata_only(monkeypatch):
    recorder = Recorder(monkeypatch, {**CURRENT, "torch": None})
    assert deps.describeDevices().startswith("PyTorch not installed yet")
    recorder.versions["torch"] = "1.13.1"
    assert "needs torch>=2.1" in deps.describeDevices()
    recorder.versions["torch"] = "2.5.1+cu121"
    assert deps.describeDevices().startswith("PyTorch 2.5.1+cu121 installed (cu121 build)")


def test_describe_devices_does_not_import_torch():
    pytest.importorskip("torch")
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(MODULE_DIR)!r})
        assert "torch" not in sys.modules
        from DeepAbdominalRegLib.dependencies import describeDevices
        text = describeDevices()
        print(json.dumps({{"text": text, "torch": "torch" in sys.modules}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["torch"] is False
    assert answer["text"].startswith(f"PyTorch {importlib.metadata.version('torch')} installed")
