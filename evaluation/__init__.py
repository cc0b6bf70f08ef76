"""Evaluation tools: Blender ground-truth renders and GLB import checks (bpy runs in subprocesses)."""
