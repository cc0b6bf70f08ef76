"""The add-on's one piece of state: the job in flight, the jobs queued behind
it, the backend connection, an auto-started backend process, the history.

:data:`MANAGER` is a module-level :class:`Manager`. The operators hand it a
:class:`Job` (what to send, and a callback that applies the result); a job
handed in while another runs waits in :attr:`Manager.queue` (``queued``) and
starts when the one before it ends. It walks the job through its phases in
:meth:`Manager.tick`, which never blocks:

* ``connecting``: a ``capabilities`` request until the backend answers (this
  also waits for an auto-started backend to come up). Nothing blocks while the
  backend is unreachable; after the request timeout the job fails with a
  clear message.
* ``running``: a :class:`gen3d_wire.client.JobWatcher` follows the job's
  stream (progress, previews, the result).
* ``cancelling``: a cancel was sent; a result that still arrives is dropped,
  so a cancelled job never changes the scene.

A job with a ``history_id`` (text and image to 3D) is written to
:attr:`Manager.history` (:mod:`.history`): its backend job id when accepted,
its result files as they arrive (before the import, so a failed import loses
nothing), its end. A job whose connection is lost, or that still runs when
the add-on is disabled or Blender quits, is not cancelled: its entry keeps
the job id, and the next connection to that backend fetches the result into
the history (:meth:`Manager.fetch_unfinished`, a ``resume_job``: ``fetch``
with ``watch`` instead of ``submit``).

In Blender's UI a ``bpy.app.timers`` callback (:func:`_timer`) calls ``tick``
on the main thread, so the result's callback runs on the main thread too. In
background mode (``bpy.app.background``: timers never fire) the operators call
:meth:`Manager.wait`, which ticks until the job is over. ``unregister`` calls
:meth:`Manager.shutdown`: sockets closed, timer removed, backend stopped.

Only the timer and redraw helpers touch bpy (imported lazily), so the state
machine itself runs anywhere.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable
from urllib.parse import urlsplit

from . import wire
from .backend_process import BackendProcess
from .hints import hint_for

IDLE = "idle"
QUEUED = "queued"
CONNECTING = "connecting"
RUNNING = "running"
CANCELLING = "cancelling"

TICK_SECONDS = 0.1


@dataclass
class AutoStart:
    python: str
    port: int
    preset: str
    cwd: str = ""
    start_timeout: float = 180.0

    def key(self) -> tuple:
        return (self.python, self.port, self.preset, self.cwd)


@dataclass
class Connection:
    """Where and how to reach the backend (from the add-on preferences)."""

    endpoint: str
    timeout: float = 10.0
    curve: Any = None  # gen3d_wire.client.CurveKeys or None
    auto_start: AutoStart | None = None
    token: str | None = None  # the client token jobs belong to (kept in the preferences)


@dataclass
class Outcome:
    """How the last job ended, for the panel (and the status bar)."""

    state: str  # "done" | "error" | "cancelled"
    panel: str  # which panel shows it: "TEXT" | "IMAGE" | "REFINE" | "PREFS"
    title: str
    message: str
    hint: str = ""
    code: str = ""
    objects: list[str] = field(default_factory=list)


@dataclass
class Job:
    kind: str | None  # None: only connect (and read the backend's capabilities)
    label: str
    panel: str
    params: dict = field(default_factory=dict)
    attachments: list = field(default_factory=list)  # gen3d_wire.protocol.Attachment
    # Called on the main thread with the result JobEvent; returns (summary, object names).
    apply: Callable[[Any], tuple[str, list[str]]] | None = None
    # runtime state, shown by the panels
    phase: str = IDLE
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    job_id: str | None = None
    preview_png: bytes | None = None
    preview_serial: int = 0
    started_at: float = 0.0
    starting_backend: bool = False
    conn: Connection | None = None  # where a queued job goes
    history_id: str | None = None  # its entry in Manager.history (text and image to 3D)
    resume_job: str | None = None  # follow this earlier backend job (by id) instead of submitting
    import_result: bool = True  # False: a fetched result goes into the history only
    outcome: Outcome | None = None  # how it ended


def human_size(n: float) -> str:
    """Bytes for the panels: 512 B, 12 KB, 1.48 MB, 4.60 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def endpoint_is_local(endpoint: str) -> bool:
    """Loopback TCP, or ipc/inproc: no network involved (``bpy.app.online_access`` does not apply)."""
    ep = endpoint.strip()
    if ep.startswith(("ipc://", "inproc://")):
        return True
    try:
        host = urlsplit(ep).hostname or ""
    except ValueError:
        return False
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bpy():
    """bpy when running inside Blender (never imports it: the state machine also runs without Blender)."""
    return sys.modules.get("bpy")


def _tag_redraw() -> None:
    bpy = _bpy()
    if bpy is None:
        return
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                for region in area.regions:
                    if region.type in ("UI", "WINDOW"):
                        region.tag_redraw()


def _timer() -> float | None:
    """The ``bpy.app.timers`` callback: one step of the job, on the main thread."""
    try:
        active = MANAGER.tick()
    except Exception:  # never let an exception kill the timer silently
        traceback.print_exc()
        MANAGER._fail("internal", f"the add-on hit an error: {traceback.format_exc(limit=1).strip().splitlines()[-1]}")
        active = False
    return TICK_SECONDS if active else None


class Manager:
    def __init__(self) -> None:
        self.job: Job | None = None
        self.outcome: Outcome | None = None
        self.backend: BackendProcess | None = None
        self.server_info: dict | None = None  # capabilities of the last backend reached, plus "endpoint"
        self.blocking: bool | None = None  # None: block in background mode only
        self.notify: Callable[[Outcome], None] | None = None  # status-bar report for non-blocking jobs
        self._conn: Connection | None = None
        self._probe = None  # gen3d_wire Client used while connecting
        self._probe_req: str | None = None
        self._deadline = 0.0
        self._watcher = None  # gen3d_wire JobWatcher while running
        self._cancel_deadline = 0.0
        self._tmpdir: str | None = None
        self._blocking_now = False
        self.queue: list[Job] = []  # waiting behind self.job, in order
        self.history = None  # history.History (set by register): where results are kept
        # builds the Job that fetches an unfinished history entry (set by register; see fetch_unfinished)
        self.resume_factory: Callable[[Any, bool], Job] | None = None
        self.models_info: dict | None = None  # the last ``models`` status: {server_preset, presets: [...]}
        # the last front-view candidates (text_to_image): {prompt, seeds, pngs, params, serial}
        self.fronts: dict | None = None
        self.installer = None  # installer.Installer of the local backend, while (and after) it runs
        self.on_installed: Callable[[Any], None] | None = None  # called on the main thread when it ends well

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        return self.job is not None

    def jobs(self) -> list[Job]:
        """The job in flight, then the queued ones."""
        return ([self.job] if self.job is not None else []) + list(self.queue)

    def is_blocking(self) -> bool:
        if self.blocking is not None:
            return self.blocking
        bpy = _bpy()
        return True if bpy is None else bool(bpy.app.background)

    def tmpdir(self) -> str:
        if self._tmpdir is None or not os.path.isdir(self._tmpdir):
            self._tmpdir = tempfile.mkdtemp(prefix="gen3d_addon_")
        return self._tmpdir

    def clear_outcome(self) -> None:
        self.outcome = None
        _tag_redraw()

    # ---------------------------------------------------------------- backend
    def backend_alive(self) -> bool:
        return self.backend is not None and self.backend.alive()

    def start_backend(self, spec: AutoStart) -> bool:
        """Start the local backend unless one with the same settings runs. True when it was started now."""
        if self.backend is not None and self.backend.alive() and getattr(self.backend, "_key", None) == spec.key():
            return False
        self.stop_backend()
        proc = BackendProcess(spec.python, spec.port, spec.preset, spec.cwd or None)
        proc._key = spec.key()
        proc.start()
        self.backend = proc
        atexit.register(self.stop_backend)  # Blender quitting does not unregister add-ons
        return True

    def stop_backend(self) -> None:
        if self.backend is not None:
            self.backend.stop()
            self.backend = None
            self.server_info = None
        atexit.unregister(self.stop_backend)

    # ------------------------------------------------------------------- jobs
    def submit(self, job: Job, conn: Connection) -> None:
        """Start ``job``, or queue it behind the running one. Raises RuntimeError when the wire code
        is missing, or for a connection test (``kind`` None) while a job runs."""
        wire.require()
        if self.job is not None:
            if job.kind is None:
                raise RuntimeError(f"'{self.job.label}' is still running: wait for it or cancel it first")
            job.phase, job.stage, job.conn = QUEUED, "queued", conn
            job.message = f"In the queue: starts after {len(self.queue) + 1} job(s)"
            self.queue.append(job)
            _tag_redraw()
            return
        self.outcome = None
        self._start(job, conn)

    def _start(self, job: Job, conn: Connection) -> None:
        self._conn = conn
        job.conn = conn
        job.phase = CONNECTING
        job.started_at = time.monotonic()
        job.stage = "connecting"
        job.message = f"Connecting to {conn.endpoint}"
        self.job = job
        timeout = conn.timeout
        if conn.auto_start is not None:
            try:
                started = self.start_backend(conn.auto_start)
            except RuntimeError as exc:
                self.job = None
                self._finish(Outcome("error", job.panel, job.label, f"Could not start the backend: {exc}",
                                     hint_for("backend_exited"), "backend_exited"))
                return
            if started or self.server_info is None:
                job.starting_backend = started
                timeout = max(timeout, conn.auto_start.start_timeout)
                job.stage = "starting backend"
                job.message = f"Starting the backend ({conn.auto_start.preset}) on port {conn.auto_start.port}"
        self._deadline = time.monotonic() + timeout
        self._open_probe()
        self._ensure_timer()
        _tag_redraw()

    def cancel(self, job: Job | None = None) -> bool:
        """Ask the running job (or ``job``, running or queued) to stop. True when there was one."""
        if job is not None and job in self.queue:
            self.queue.remove(job)
            self._forget(job)
            self._renumber()
            self.outcome = job.outcome = Outcome("cancelled", job.panel, job.label,
                                                 "Taken out of the queue before it was sent.")
            _tag_redraw()
            return True
        if job is not None and job is not self.job:
            return False
        job = self.job
        if job is None:
            return False
        if job.phase == CONNECTING or self._watcher is None:
            self._finish(Outcome("cancelled", job.panel, job.label, "Cancelled before the backend started the job."))
            return True
        if job.phase != CANCELLING:
            job.phase = CANCELLING
            job.message = "Cancelling..."
            self._watcher.cancel()
            self._cancel_deadline = time.monotonic() + max(5.0, self._conn.timeout if self._conn else 10.0)
            _tag_redraw()
        return True

    def clear_queue(self) -> int:
        """Take every queued job out (none was sent). Returns how many."""
        n = len(self.queue)
        for job in self.queue:
            self._forget(job)
        self.queue.clear()
        _tag_redraw()
        return n

    def _renumber(self) -> None:
        for i, q in enumerate(self.queue):
            q.message = f"In the queue: starts after {i + 1} job(s)"

    def _forget(self, job: Job) -> None:
        """The history entry of a job that was never sent goes."""
        if self.history is not None and job.history_id and not job.resume_job:
            try:
                self.history.remove(job.history_id)
            except OSError:
                traceback.print_exc()

    def fetch_unfinished(self, conn: Connection, import_result: bool = False) -> int:
        """Queue a fetch for each history entry sent to ``conn``'s backend whose end was never seen
        (the connection was lost, or Blender closed). Returns how many were queued."""
        if self.history is None or self.resume_factory is None:
            return 0
        followed = {j.history_id for j in self.jobs() if j.history_id}
        n = 0
        for entry in self.history.unfinished():
            if entry.id in followed or (entry.endpoint and entry.endpoint != conn.endpoint):
                continue
            # with the token it was sent with (the preferences' may have changed, or never been saved)
            self.submit(self.resume_factory(entry, import_result), replace(conn, token=entry.token or conn.token))
            n += 1
        return n

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Tick until the job, and those queued behind it, are over (background mode, scripts, tests)."""
        end = None if timeout is None else time.monotonic() + timeout
        self._blocking_now = True
        try:
            while self.job is not None:
                if end is not None and time.monotonic() > end:
                    break
                self.tick()
                if self.job is not None:
                    time.sleep(0.02)
        finally:
            self._blocking_now = False
        return self.outcome

    def installing(self) -> bool:
        return self.installer is not None and self.installer.state == "running"

    def start_install(self, inst) -> None:
        """Run ``inst`` (an installer.Installer) from the timer."""
        if self.installing():
            raise RuntimeError("the local backend is being installed already")
        self.installer = inst
        inst.start()
        self._ensure_timer()
        _tag_redraw()

    def _tick_installer(self) -> None:
        inst = self.installer
        before = (inst.index, inst.package)
        state = inst.poll()
        if state != "running":
            if state == "done" and self.on_installed is not None:
                try:
                    self.on_installed(inst)
                except Exception:
                    traceback.print_exc()
            _tag_redraw()
        elif (inst.index, inst.package) != before:
            _tag_redraw()

    def tick(self) -> bool:
        """One non-blocking step. Returns True while a job is in flight or the installer runs."""
        if self.installing():
            self._tick_installer()
        job = self.job
        if job is not None:
            if job.phase == CONNECTING:
                self._tick_connecting(job)
            elif job.phase in (RUNNING, CANCELLING):
                self._tick_running(job)
        return self.job is not None or self.installing()

    # -------------------------------------------------------------- internals
    def _open_probe(self) -> None:
        _, C = wire.require()
        self._close_probe()
        # timeout 0: a send without a connection fails at once (retried next tick) instead of blocking the UI
        self._probe = C.Client(self._conn.endpoint, timeout=0.0, curve=self._conn.curve, token=self._conn.token)
        self._probe_req = None

    def _close_probe(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        self._probe_req = None

    def _tick_connecting(self, job: Job) -> None:
        P, C = wire.require()
        conn = self._conn
        if self._probe_req is None:
            req = C.new_req()
            try:
                self._probe.send(P.capabilities_request(req, self._probe.token))
                self._probe_req = req
            except C.BackendError:
                pass  # not connected yet: try again next tick
        if self._probe_req is not None:
            for msg in self._probe.poll(0):
                if msg.get("req") != self._probe_req:
                    continue
                if msg.type == P.ERROR:
                    self._fail(msg.get("code"), msg.get("message"))
                    return
                info = {k: v for k, v in msg.header.items() if k not in ("v", "type", "req", "attachments")}
                info["endpoint"] = conn.endpoint
                self.server_info = info
                self._connected(job, info)
                return
        if job.starting_backend or conn.auto_start is not None:
            proc = self.backend
            if proc is not None and not proc.alive() and time.monotonic() - job.started_at > 1.0:
                tail = " | ".join(proc.log_tail(4))
                self._fail("backend_exited", f"The backend process exited (code {proc.returncode}): {tail}")
                return
        if time.monotonic() > self._deadline:
            waited = self._deadline - job.started_at
            msg = f"No answer from the backend at {conn.endpoint} within {waited:.3g} s."
            code = "curve" if conn.curve is not None else "unreachable"
            self._fail(code, msg)

    def _connected(self, job: Job, info: dict) -> None:
        _, C = wire.require()
        if job.kind is None:
            self._close_probe()
            self.fetch_unfinished(self._conn)  # queued: they start when this connection test ends
            dev = info.get("device", {}) or {}
            name = dev.get("gpu_name") or dev.get("device") or "?"
            self._finish(Outcome("done", job.panel, job.label,
                                 f"Connected to {info['endpoint']}: gen3d {info.get('server', '?')} on {name}"))
            return
        kinds = info.get("job_kinds") or {}
        if kinds and job.kind not in kinds:
            self._fail("unknown_kind", f"The backend at {info['endpoint']} does not offer '{job.kind}' "
                                       f"(it offers: {', '.join(sorted(kinds))}).")
            return
        conn = self._conn
        # Hand the watcher the probe's socket, which is connected already: a fresh one would make the
        # submit wait (block the UI) until its connection is up. Its send waits at most half a second.
        probe, self._probe, self._probe_req = self._probe, None, None
        probe.timeout = min(0.5, conn.timeout)
        watcher = C.JobWatcher(conn.endpoint, job.kind, job.params, job.attachments, timeout=conn.timeout,
                               curve=conn.curve, client=probe)
        self._watcher = watcher
        job.phase = RUNNING
        if job.resume_job:
            job.job_id = job.resume_job
            job.stage = "queued"
            job.message = f"Fetching job {job.resume_job}"
            watcher.attach(job.resume_job)
        else:
            job.stage = "submitting"
            job.message = "Sending the job"
            watcher.start()
        if not job.resume_job:
            self.fetch_unfinished(conn)  # results that waited for this backend while the add-on was away
        _tag_redraw()

    def _tick_running(self, job: Job) -> None:
        watcher = self._watcher
        changed = False
        for ev in watcher.poll():
            changed = True
            if ev.kind == "accepted":
                job.job_id = ev.job
                self._history("accepted", job, ev.job)
                if job.phase != CANCELLING:
                    job.stage = "queued"
                    job.message = "Waiting for the backend"
            elif ev.kind == "progress":
                job.stage = ev.stage or job.stage
                job.fraction = float(ev.fraction or 0.0)
                if job.phase != CANCELLING:
                    job.message = ev.message or ""
                if ev.preview_png:
                    job.preview_png = ev.preview_png
                    job.preview_serial += 1
            elif ev.kind == "result":
                if job.phase == CANCELLING:
                    self._finish(Outcome("cancelled", job.panel, job.label,
                                         "Cancelled (the result that still arrived was dropped)."))
                else:
                    self._history("finished", job, dict(ev.attachments or {}),
                                  ev.metadata if isinstance(ev.metadata, dict) else {})
                    self._apply(job, ev)
                return
            elif ev.kind == "error":
                self._fail(ev.code, ev.message)
                return
            elif ev.kind == "cancelled":
                self._finish(Outcome("cancelled", job.panel, job.label, "Cancelled."))
                return
        if job.phase == CANCELLING and time.monotonic() > self._cancel_deadline:
            self._finish(Outcome("cancelled", job.panel, job.label,
                                 "Cancelled (the backend did not confirm; its job may still finish on its side)."))
            return
        if changed:
            _tag_redraw()

    def _history(self, what: str, job: Job, *args) -> None:
        if self.history is None or not job.history_id:
            return
        try:
            getattr(self.history, what)(job.history_id, *args)
        except OSError:  # a full disk must not lose the job itself
            traceback.print_exc()

    def _apply(self, job: Job, ev) -> None:
        if not job.import_result:
            self._finish(Outcome("done", job.panel, job.label,
                                 "Fetched into the history (Import it from the History panel)."))
            return
        try:
            summary, names = job.apply(ev) if job.apply else ("Done.", [])
        except Exception as exc:
            traceback.print_exc()
            self._fail("import_failed", f"Could not use the result: {exc} (it is kept in the history)")
            return
        self._history("imported", job)
        self._finish(Outcome("done", job.panel, job.label, summary, objects=list(names)))

    def _fail(self, code: str | None, message: str | None) -> None:
        job = self.job
        panel, label = (job.panel, job.label) if job else ("PREFS", "gen3d")
        code = code or "job_failed"
        self._finish(Outcome("error", panel, label, message or code, hint_for(code), code))

    def _end_entry(self, job: Job, outcome: Outcome) -> None:
        """The history entry of a job that ended without a result: gone when the job was never
        accepted or was cancelled; kept with its job id when the connection was lost (fetched on
        the next connection); marked failed otherwise."""
        if self.history is None or not job.history_id or outcome.state == "done":
            return
        entry = self.history.get(job.history_id)
        if entry is None or entry.state == "done":
            return
        try:
            if outcome.code in ("unreachable", "curve") and job.job_id:
                entry.message = "The connection was lost: the result is fetched when the backend is reached again."
                self.history.save()
            elif (outcome.state == "cancelled" or not job.job_id) and not job.resume_job:
                self.history.remove(job.history_id)
            else:
                self.history.ended(job.history_id, "error" if outcome.state == "error" else "cancelled",
                                   outcome.message)
        except OSError:
            traceback.print_exc()

    def _finish(self, outcome: Outcome) -> None:
        if self.job is not None:
            self.job.outcome = outcome
            self._end_entry(self.job, outcome)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._close_probe()
        self.job = None
        self.outcome = outcome
        if outcome.state == "error" and not self._blocking_now:
            print(f"gen3d: {outcome.title}: {outcome.message}" + (f" ({outcome.hint})" if outcome.hint else ""))
        if self.notify is not None and not self._blocking_now:
            try:
                self.notify(outcome)
            except Exception:
                traceback.print_exc()
        if self.queue:  # the next one (its outcome replaces this one's only when it ends)
            nxt = self.queue.pop(0)
            self._renumber()
            self._start(nxt, nxt.conn)
        _tag_redraw()

    def _ensure_timer(self) -> None:
        bpy = _bpy()
        if bpy is None:
            return
        if not bpy.app.timers.is_registered(_timer):
            bpy.app.timers.register(_timer, first_interval=TICK_SECONDS, persistent=True)

    def shutdown(self) -> None:
        """Everything the add-on holds: job (cancelled, unless the history keeps it: then it runs on and its
        result is fetched on the next connection), queue, installer (cancelled), sockets, timer, backend
        process, temp files."""
        if self.installing():
            self.installer.cancel()
        self.installer = None
        self.on_installed = None
        self.clear_queue()
        job = self.job
        kept = job is not None and job.history_id and job.job_id and self.history is not None
        if job is not None and job.history_id and not job.job_id:
            self._forget(job)  # sent, perhaps, but never accepted: nothing to fetch it by
        if self._watcher is not None and job is not None and job.job_id and not self._watcher.done and not kept:
            try:
                self._watcher.cancel()  # best effort: do not leave the GPU busy for nobody
            except Exception:
                pass
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._close_probe()
        self.job = None
        self.outcome = None
        self.notify = None
        self.blocking = None
        self.history = None
        self.resume_factory = None
        self.models_info = None
        self.fronts = None
        bpy = _bpy()
        if bpy is not None and bpy.app.timers.is_registered(_timer):
            bpy.app.timers.unregister(_timer)
        self.stop_backend()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


MANAGER = Manager()
