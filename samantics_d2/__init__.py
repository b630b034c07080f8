"""samantics_d2: a Detectron2 extension that gives the Segment Anything Model semantics.

``import samantics_d2`` registers the project's datasets (COCO, LVIS, synthetic shapes) and its
components (backbones, meta-architectures) in the registries of the active backend
(see :mod:`samantics_d2.d2`).
"""
from . import d2  # noqa: F401  (choose the backend first)
from . import data  # noqa: F401  (dataset registration)
from . import modeling  # noqa: F401  (backbones)
from .modeling import linear_probe, meta_arch  # noqa: F401  (meta-architectures)
from .yacs_plugin import add_samantics_config  # noqa: F401  (the yacs plug-in path)

from .version import __version__
