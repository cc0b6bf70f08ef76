"""The generation history: every text/image-to-3D job the add-on sent, kept on disk.

One folder (the extension's user folder, ``history/``) holds ``history.json`` and, per
entry, the result GLB, a thumbnail (the reference image the backend framed, or the one the
user sent) and what is needed to send the job again (its kind, parameters and reference
image). An entry is written when the job is sent, gets the backend's job id when it is
accepted, and its result or end when it ends, so a job still running when Blender closed
(or the connection dropped) keeps its id, and its result can be fetched later.

No bpy here: the panels read :meth:`History.entries`, the manager writes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

MAX_ENTRIES = 50
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "error", "cancelled"


@dataclass
class Entry:
    id: str
    kind: str
    label: str = ""  # the prompt, or the image's name
    name: str = ""  # the object's name in the scene
    params: dict = field(default_factory=dict)  # as sent
    state: str = RUNNING
    job: str | None = None  # the backend's job id, once accepted
    endpoint: str = ""
    token: str = ""  # the client token it was sent with: its result is fetched with it
    created: float = 0.0  # time.time()
    seconds: float = 0.0
    message: str = ""
    glb: str = ""  # file names in the history folder
    quads: str = ""  # the quads.json that came with it (topology quad)
    thumb: str = ""
    image: str = ""  # the reference image sent (image_to_3d), for Regenerate
    metadata: dict = field(default_factory=dict)  # the result's metadata
    imports: int = 0  # how many times it was placed in a scene

    @property
    def seed(self) -> int:
        return int(self.params.get("seed", 0))


class History:
    def __init__(self, folder: str, max_entries: int = MAX_ENTRIES) -> None:
        self.folder = folder
        self.max_entries = max_entries
        self._entries: list[Entry] = []
        os.makedirs(folder, exist_ok=True)
        self.load()

    # ------------------------------------------------------------ storage
    @property
    def path(self) -> str:
        return os.path.join(self.folder, "history.json")

    def load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as fh:
                raw = json.load(fh)
        except (OSError, ValueError):
            self._entries = []
            return
        names = Entry.__dataclass_fields__
        self._entries = []
        for e in raw.get("entries", []) if isinstance(raw, dict) else []:
            if not (isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("kind"), str)):
                continue
            try:
                entry = Entry(**{k: v for k, v in e.items() if k in names})
            except TypeError:
                continue
            if not (isinstance(entry.params, dict) and isinstance(entry.metadata, dict)):
                continue
            if entry.state == RUNNING and not entry.job:
                continue  # never accepted by a backend (Blender stopped while sending): nothing to fetch
            self._entries.append(entry)

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"version": 1, "entries": [asdict(e) for e in self._entries]}, fh, indent=1)
        os.replace(tmp, self.path)

    def _write(self, name: str, data: bytes) -> str:
        with open(os.path.join(self.folder, name), "wb") as fh:
            fh.write(data)
        return name

    def file(self, name: str) -> str | None:
        """The full path of an entry's file, or None when it is missing."""
        if not name:
            return None
        p = os.path.join(self.folder, name)
        return p if os.path.isfile(p) else None

    def read(self, name: str) -> bytes | None:
        p = self.file(name)
        if p is None:
            return None
        with open(p, "rb") as fh:
            return fh.read()

    # ------------------------------------------------------------ entries
    def entries(self) -> list[Entry]:
        """Newest first."""
        return list(reversed(self._entries))

    def get(self, entry_id: str) -> Entry | None:
        return next((e for e in self._entries if e.id == entry_id), None)

    def add(self, kind: str, label: str, params: dict, endpoint: str = "", image_png: bytes | None = None,
            name: str = "", token: str = "") -> Entry:
        e = Entry(uuid.uuid4().hex[:12], kind, label, name=name, params=dict(params), endpoint=endpoint,
                  token=token or "", created=time.time())
        if image_png:
            e.image = self._write(f"{e.id}_input.png", image_png)
            e.thumb = e.image
        self._entries.append(e)
        self._trim()
        self.save()
        return e

    def accepted(self, entry_id: str, job: str) -> None:
        e = self.get(entry_id)
        if e is not None:
            e.job = job
            self.save()

    def finished(self, entry_id: str, attachments: dict, metadata: dict | None = None, message: str = "") -> None:
        """The result arrived: its model (and quads, and the front image the backend made or framed
        as the thumbnail) into the folder, before anything is imported, so a failed import loses nothing."""
        e = self.get(entry_id)
        if e is None:
            return
        glb = attachments.get("model.glb")
        if glb:
            e.glb = self._write(f"{e.id}.glb", glb)
        if attachments.get("quads.json"):
            e.quads = self._write(f"{e.id}_quads.json", attachments["quads.json"])
        if attachments.get("reference.png"):
            e.thumb = self._write(f"{e.id}_thumb.png", attachments["reference.png"])
        e.metadata = dict(metadata or {})
        e.state, e.message = DONE, message
        e.seconds = time.time() - e.created
        self.save()

    def imported(self, entry_id: str) -> None:
        e = self.get(entry_id)
        if e is not None:
            e.imports += 1
            self.save()

    def result(self, entry_id: str) -> dict[str, bytes]:
        """The kept result's files by their attachment names (empty when the model is gone)."""
        e = self.get(entry_id)
        glb = self.read(e.glb) if e is not None else None
        if not glb:
            return {}
        out = {"model.glb": glb}
        q = self.read(e.quads)
        if q:
            out["quads.json"] = q
        return out

    def ended(self, entry_id: str, state: str, message: str = "") -> None:
        """An end without a result (error or cancelled)."""
        e = self.get(entry_id)
        if e is None:
            return
        e.state, e.message = state, message
        e.seconds = time.time() - e.created
        self.save()

    def unfinished(self) -> list[Entry]:
        """Sent and accepted but never seen to end: their results may wait on the backend."""
        return [e for e in self.entries() if e.state == RUNNING and e.job]

    def remove(self, entry_id: str) -> None:
        e = self.get(entry_id)
        if e is None:
            return
        self._entries.remove(e)
        self._delete_files(e)
        self.save()

    def _delete_files(self, e: Entry) -> None:
        for name in {e.glb, e.quads, e.thumb, e.image} - {""}:
            try:
                os.remove(os.path.join(self.folder, name))
            except OSError:
                pass

    def _trim(self) -> None:
        """The oldest entries go first, but never one whose job may still be running."""
        while len(self._entries) > self.max_entries:
            old = next((e for e in self._entries if e.state != RUNNING), None)
            if old is None:
                break
            self._entries.remove(old)
            self._delete_files(old)
