"""The local web app (``tools/app.py``, ``make app``) and its Python API.

:mod:`.classes` holds the user's classes (reference masks and words, saved as one file);
:mod:`.workspace` is what every button of the app calls (one model, the classes, a working folder);
:mod:`.ui` lays out the Gradio page over it (imported only by the app: Gradio is the ``[app]`` extra).
"""
from .classes import ClassBank, ClassEntry, ReferenceMask
from .workspace import Segmentation, Workspace, WorkspaceError

__all__ = ["ClassBank", "ClassEntry", "ReferenceMask", "Segmentation", "Workspace", "WorkspaceError"]
