# ruff: noqa: N999  (Slicer names a module's library folder <Module>Lib)
"""Slicer glue for the DeepAbdominalReg module: MRML <-> core conversions, display, background task, dependencies.

Modules here may use MRML/VTK; Qt and ctk are imported lazily inside the few GUI-only functions, so that
``nodes``, ``display``, ``parameters`` and ``task`` import (and are tested) with PyPI's ``slicer-core``, without the
Slicer application.

* :mod:`.parameters`   RegistrationConfig <-> parameter-node values (pure Python)
* :mod:`.nodes`        volumes, segmentations, markups, transforms <-> SimpleITK / numpy (the one owner of RAS <-> LPS)
* :mod:`.display`      colour maps, overlays, legends, metrics table
* :mod:`.task`         registration runs: blocking in-process, or background ``PythonSlicer -m deepabdominalreg``
* :mod:`.dependencies` torch & co. installed on first use after confirmation, never at import
"""
