"""What to tell the user for each error code: the add-on shows the backend's
message and, below it, what to do about it."""

from __future__ import annotations

HINTS = {
    "unreachable": "Start the backend (python -m backend serve), turn on Auto-start in the add-on preferences, "
                   "or check the endpoint there (Edit > Preferences > Add-ons > gen3d).",
    "curve": "The backend did not answer over an encrypted connection: check the server key in the add-on "
             "preferences (the backend's KEYDIR/server.key).",
    "model_missing": "The backend lacks model weights: on the backend's machine run the command in the message "
                     "(python -m backend prefetch), or use the 'tiny' preset to try things out.",
    "out_of_memory": "The backend ran out of memory: choose the Draft quality, a smaller face budget or texture "
                     "size, or close other programs using the GPU.",
    "queue_full": "The backend is busy with other jobs: try again in a while.",
    "unknown_kind": "This backend does not offer this job: update the backend (or the add-on) so their versions match.",
    "bad_params": "The backend refused the settings: update the backend (or the add-on) so their versions match.",
    "bad_version": "The backend speaks another protocol version: update the backend or the add-on.",
    "too_large": "The input is too large for the backend: use a smaller image or a lighter mesh.",
    "bad_input": "The backend could not use the input: check the image (a clear object on a plain background) "
                 "or the mesh (triangles, no NaN).",
    "job_failed": "The job failed inside the backend: see the backend's log for details.",
    "internal": "The backend hit a bug: see its log, and report it with the message above.",
    "online_access": "Allow online access in Edit > Preferences > System > Network, or use a backend on this "
                     "computer (tcp://127.0.0.1:5555).",
    "no_wire": "Install the add-on from the gen3d-<version>.zip built by build_addon.py (it bundles pyzmq).",
    "backend_exited": "The auto-started backend stopped: check the Python path in the add-on preferences "
                      "(that Python must have the backend installed: python -m backend --version).",
    "import_failed": "The result arrived but could not be imported: see the system console for details and "
                     "report the message above.",
    "input": "",
}


def hint_for(code: str | None) -> str:
    return HINTS.get(code or "", HINTS["job_failed"] if code else "")
