# ruff: noqa: N999  (Slicer names a module's library folder <Module>Lib)
"""Slicer glue for the DeepAbdominalReg module: MRML <-> core conversions, display, runs, dependencies.

Modules here may use MRML/VTK; Qt and ctk are imported lazily inside the few GUI-only functions, so that every
module imports (and is tested) with PyPI's ``slicer-core``, without the Slicer application.

* :mod:`.parameters`   RegistrationConfig <-> parameter-node values (pure Python)
* :mod:`.nodes`        volumes, segmentations, markups, transforms <-> SimpleITK / numpy (the one owner of RAS <-> LPS)
* :mod:`.display`      colour maps, overlays, legends, metrics table
* :mod:`.task`         a run's MRML side: input nodes -> core inputs, core outputs -> nodes (all or nothing);
                       in-process (blocking) or through :mod:`.process`
* :mod:`.process`      the background run: files, ``PythonSlicer -m deepabdominalreg register --config`` subprocess,
                       progress, cancel (process-tree kill), clean-up; no MRML
* :mod:`.dependencies` torch & co. installed on first use after confirmation, never at import
* :mod:`.reloading`    *Reload* in developer mode: the core and this Lib, each module after its imports
* :mod:`.testing`      the core's phantom pair as MRML nodes (self-test and pytest)
"""
