"""The ``models`` job: what a preset's models are, whether they are on the backend's disk,
fetching them (with files and bytes as progress, cancellable) and removing them.

It is the add-on's model manager on the wire: the backend's disk is where the models
live, which need not be Blender's machine. ``preset`` empty means the server's own
preset (with its overrides); any other known preset is looked up in the table.
"""

from __future__ import annotations

from ..common.errors import InputError
from ..models import manage
from ..models.files import human_size
from ..models.presets import PRESETS, resolve
from ..service.jobs import JobContext, JobInputs, JobOutput, JobSpec, Param


def _preset(name: str, ctx: JobContext):
    own = getattr(ctx.models, "preset", None)
    if not name or (own is not None and name == own.name):
        if own is None:
            raise InputError("this backend has no model store: name a preset")
        return own
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return resolve(name)


def _report(preset, models) -> dict:
    return {"preset": preset.name, "description": preset.description,
            "models": [m.to_dict() for m in models], "present": all(m.present for m in models),
            "bytes": sum(m.bytes for m in models)}


def _handle(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    p = inputs.params
    action = p["action"]
    if p["preset"] == "*":  # every preset of the table (and the server's own first), for the add-on's list
        if action != "status":
            raise InputError("preset '*' is for status only: download or remove one preset at a time")
        own = getattr(ctx.models, "preset", None)
        names = ([own.name] if own is not None else []) + [n for n in PRESETS if own is None or n != own.name]
        return JobOutput([], {"server_preset": own.name if own is not None else None,
                              "presets": [_report(pr, manage.states(pr)) for pr in (_preset(n, ctx) for n in names)]})
    preset = _preset(p["preset"], ctx)
    if action == "status":
        return JobOutput([], _report(preset, manage.states(preset)))
    if action == "remove":
        return JobOutput([], _report(preset, manage.remove(preset, p["roles"] or None)))
    pr = ctx.progress.child("download", 0.0, 1.0)
    last = [-1]

    def progress(files_done, files_total, bytes_done, bytes_total, what):
        frac = min(bytes_done / bytes_total, 1.0) if bytes_total else (files_done / files_total if files_total else 1.0)
        sizes = f", {human_size(bytes_done)}" + (f" of {human_size(bytes_total)}" if bytes_total else "")
        # every finished file is reported (the byte ticks in between are rate-limited)
        pr.update(frac, f"{files_done}/{files_total} files{sizes}" + (f": {what}" if what else ""),
                  force=files_done != last[0])
        last[0] = files_done

    models = manage.download(preset, progress, cancelled=lambda: pr.cancelled)
    pr.check()  # a cancel that stopped the download ends the job as cancelled
    return JobOutput([], _report(preset, models))


def _roles(value: list) -> list:
    if not all(r in ("text_to_image", "novel_view") for r in value):
        raise ValueError("roles are text_to_image and novel_view")
    return list(value)


SPEC = JobSpec(
    kind="models",
    description="The models of a preset on the backend's disk: status, download (progress in files and bytes), remove.",
    handler=_handle,
    params=(
        Param("action", str, "status", "status | download | remove", choices=("status", "download", "remove")),
        Param("preset", str, "", "a preset of the table ('' = the server's own, with its overrides; '*' = all, "
                                 "for status)", cli=False),
        Param("roles", list, [], "remove only these roles (text_to_image, novel_view); empty: all", check=_roles,
              cli=False),
    ),
)
