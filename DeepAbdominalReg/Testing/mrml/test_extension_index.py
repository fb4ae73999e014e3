"""The ExtensionsIndex entry (ready to submit to github.com/Slicer/ExtensionsIndex) agrees with the CMake metadata."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ENTRY = ROOT / "ExtensionsIndex" / "DeepAbdominalReg.json"
SCHEMA_V102_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
"""Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json: ``additionalProperties: false``."""


def _cmakeValue(name: str) -> str:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    match = re.search(rf'set\({name} "([^"]*)"\)', text)
    assert match, f"{name} not set in CMakeLists.txt"
    return match.group(1)


def test_entry_follows_the_catalog_schema():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert {"$schema", "category", "scm_url"} <= set(entry) <= SCHEMA_V102_PROPERTIES
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert all(isinstance(d, str) for d in entry["build_dependencies"])


def test_entry_and_cmake_metadata_agree():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert entry["category"] == _cmakeValue("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == _cmakeValue("EXTENSION_DEPENDS").split()
    repository = entry["scm_url"].removesuffix(".git")
    assert _cmakeValue("EXTENSION_HOMEPAGE").startswith(repository)
    owner_name = repository.removeprefix("https://github.com/")
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in _cmakeValue(key).split():
            prefix = f"https://raw.githubusercontent.com/{owner_name}/{entry['scm_revision']}/"
            assert url.startswith(prefix), f"{key} {url} is not a file of {owner_name}@{entry['scm_revision']}"
            assert (ROOT / url.removeprefix(prefix)).is_file(), f"{key}: {url} names no file of the repository"
