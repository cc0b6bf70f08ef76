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
    from .manager import MANAGER

    for cls in _classes():
        bpy.utils.register_class(cls)
    props.register_properties()
    MANAGER.notify = operators.notify


def unregister():
    import bpy

    from . import props, ui
    from .manager import MANAGER

    MANAGER.shutdown()  # cancels the job, closes sockets, removes the timer, stops a started backend
    ui.clear_previews()
    props.unregister_properties()
    for cls in reversed(_classes()):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
