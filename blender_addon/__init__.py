"""gen3d for Blender: text and image to textured 3D, and texture refinement,
through a gen3d backend (local or remote) over ZeroMQ.

The add-on is thin: it gathers inputs from the scene, sends a job, shows its
progress in the 3D Viewport's sidebar (Generate tab) and imports the result.
Everything else happens in the backend (``python -m backend serve``).

Blender 4.2+ extension: see blender_manifest.toml. bpy is imported inside
``register``/``unregister`` so that the bpy-free helpers (``glb``, ``png``)
can be imported anywhere.
"""

from __future__ import annotations


def _classes():
    from . import operators, prefs, props, ui

    return (*props.CLASSES, *prefs.CLASSES, *operators.CLASSES, *ui.CLASSES)


def register():
    import bpy

    from . import operators, props
    from .history import History
    from .manager import MANAGER

    for cls in _classes():
        bpy.utils.register_class(cls)
    props.register_properties()
    MANAGER.notify = operators.notify
    MANAGER.history = History(history_folder())
    MANAGER.resume_factory = operators.resume_job
    MANAGER.on_installed = operators.installed


def history_folder() -> str:
    """``history/`` in the extension's user folder (kept across upgrades); the config folder when the
    add-on runs as a legacy add-on, which has none."""
    import os

    import bpy

    try:
        return bpy.utils.extension_path_user(__package__, path="history", create=True)
    except (ValueError, TypeError, AttributeError):
        return os.path.join(bpy.utils.user_resource("CONFIG", path="gen3d", create=True), "history")


def unregister():
    import bpy

    from . import props, ui
    from .manager import MANAGER

    # cancels the job (one kept in the history runs on), closes sockets, removes the timer, stops a started backend
    MANAGER.shutdown()
    ui.clear_previews()
    props.unregister_properties()
    for cls in reversed(_classes()):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
