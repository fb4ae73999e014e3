"""DeepAbdominalReg core library: deep-learning deformable registration of abdominal CT.

Slicer-independent (torch, SimpleITK, numpy, scipy, scikit-image, matplotlib). Physical space is LPS, in mm.
"""

__version__ = "0.1.0"
