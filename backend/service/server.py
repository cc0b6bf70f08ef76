"""The backend service: a ZeroMQ ROUTER socket loop and one job worker thread.

* The socket loop (the thread that calls :meth:`Server.serve_forever`) owns the
  ROUTER socket. It validates every request, answers ping/status/capabilities
  and fetch itself, queues submits, and forwards the worker's events. It never
  runs a job, so a long job never delays a ping or a cancel.
* One worker thread (one GPU) takes jobs from a bounded FIFO queue and runs the
  job kind's handler. It talks to the socket loop over an inproc PUSH/PULL pair
  (ZeroMQ sockets are not shared between threads).
* Every finished job is written under ``jobs_dir/<job id>/`` (``job.json`` and
  ``result/``) before its result is sent, so ``fetch`` can return it later,
  even after a restart.
* A job belongs to the client that submitted it: its ``client`` token (with
  CurveZMQ and an authorized-clients folder, also its public key), or without a
  token its connection. Other clients are told ``unknown_job``, unless the server
  runs with ``shared_jobs``. Request ids are de-duplicated per client.
* Nothing one message does can end the socket loop: every reply encodes (echoed
  values are cut, error messages are bounded and never name the server's files
  or memory addresses), and anything raised while handling a message is logged
  and answered.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from gen3d_wire import protocol as P
from gen3d_wire.protocol import Attachment, ErrorCode, ProtocolError

from ..common import device as dev
from .jobs import JobContext, JobError, JobInputs, Limits, Registry
from ..common.progress import Cancelled, Progress

log = logging.getLogger("gen3d.server")

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_JOBS_IN_MEMORY = 1000
MAX_REQ_IDS = 4096
MAX_EXPIRED = 10000  # ids of pruned jobs remembered, to answer 'expired' rather than 'unknown_job'
EXPIRED_FILE = "expired.jsonl"


class ConfigError(Exception):
    """The server cannot start with this configuration (the message says why and what to do)."""


def default_jobs_dir() -> Path:
    base = os.environ.get("GEN3D_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "gen3d")
    return Path(base) / "jobs"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5555  # 0: a free port (tests)
    preset: str = "tiny"
    device: str = "auto"
    jobs_dir: Path = field(default_factory=default_jobs_dir)
    max_queue: int = 64
    keep_jobs: int = 500  # finished job folders kept on disk
    limits: Limits = field(default_factory=Limits)
    keys_dir: Path | None = None  # holds server.key_secret (python -m backend keys generate DIR)
    authorized_clients: Path | None = None  # folder of client *.key files allowed in (optional)
    shared_jobs: bool = False  # every client may see, fetch and cancel every job (one trusted team)


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_security(config: ServerConfig) -> None:
    if is_loopback(config.host):
        return
    if config.keys_dir is None:
        raise ConfigError(
            f"refusing to listen on {config.host!r} without encryption: only 127.0.0.1 is safe without keys.\n"
            "Make keys with:   python -m backend keys generate KEYDIR\n"
            f"then start with: python -m backend serve --host {config.host} --keys KEYDIR\n"
            "and give clients KEYDIR/server.key (the public key)."
        )
    secret = Path(config.keys_dir) / "server.key_secret"
    if not secret.is_file():
        raise ConfigError(f"{secret} not found; make keys with: python -m backend keys generate {config.keys_dir}")


@dataclass
class Job:
    id: str
    kind: str
    params: dict
    inputs: JobInputs | None
    identity: bytes | None
    envelope: bool = False  # client is a REQ socket (empty delimiter frame)
    req: str | None = None
    owner: str | None = None  # owner_key() of the submitting client
    state: str = P.QUEUED
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    error_code: str | None = None
    error_message: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    metadata: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)

    def record(self) -> dict:
        rec = {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "state": self.state,
            "stage": self.stage,
            "fraction": self.fraction,
            "message": self.message,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "metadata": self.metadata,
            "results": self.results,
            "owner": self.owner,
            "req": self.req,
        }
        if self.error_code:
            rec["error"] = {"code": self.error_code, "message": self.error_message}
        if self.state == P.RUNNING and self.cancel.is_set():
            rec["cancel_requested"] = True
        return rec


class Server:
    def __init__(
        self,
        config: ServerConfig,
        registry: Registry,
        models: Any = None,
        context: zmq.Context | None = None,
        announce: Any = None,
    ):
        self.config = config
        self.announce = announce  # called with the bound endpoint once listening
        self.registry = registry
        self.models = models
        self.device = dev.pick_device(config.device)
        self.jobs_dir = Path(config.jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=config.max_queue)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._by_req: OrderedDict[tuple[str, str], str] = OrderedDict()  # (owner, req) -> job id
        self._expired: OrderedDict[str, str | None] = OrderedDict()  # pruned job id -> owner
        self._lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._inproc = f"inproc://gen3d-events-{uuid.uuid4().hex}"
        self._started_at = time.time()
        self._running_job: Job | None = None
        self._startup_error: BaseException | None = None
        self.endpoint: str | None = None
        self._worker: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._auth = None
        self.counters = {"requests": 0, "bad_messages": 0, "jobs_done": 0, "jobs_failed": 0, "jobs_cancelled": 0}
        self._recover_stale()

    def _recover_stale(self) -> None:
        """Jobs left queued or running by a server that stopped are marked failed; the request
        ids of the jobs on disk and the ids of pruned jobs are remembered."""
        reqs = []
        for path in self.jobs_dir.glob("*/job.json"):
            try:
                rec = json.loads(path.read_text())
                if not isinstance(rec, dict):
                    continue
                if rec.get("state") in (P.QUEUED, P.RUNNING):
                    rec["state"] = P.FAILED
                    rec["error"] = {"code": ErrorCode.JOB_FAILED, "message": "the server stopped before this job finished; submit it again"}
                    path.write_text(json.dumps(rec, indent=1, default=str))
            except (OSError, ValueError):
                continue
            if isinstance(rec.get("owner"), str) and isinstance(rec.get("req"), str) and isinstance(rec.get("id"), str):
                reqs.append((rec.get("created") or 0, (rec["owner"], rec["req"]), rec["id"]))
        for _, key, job_id in sorted(reqs, key=lambda r: r[0] if isinstance(r[0], (int, float)) else 0)[-MAX_REQ_IDS:]:
            self._by_req[key] = job_id
        try:
            with open(self.jobs_dir / EXPIRED_FILE, encoding="utf-8") as f:
                for line in f:
                    try:
                        e = json.loads(line)
                        self._expired[str(e["id"])] = e.get("owner")
                    except (ValueError, KeyError, TypeError):
                        continue
        except OSError:
            pass
        while len(self._expired) > MAX_EXPIRED:
            self._expired.popitem(last=False)

    # -- lifecycle --------------------------------------------------------------
    def _bind(self) -> tuple[zmq.Socket, zmq.Socket]:
        check_bind_security(self.config)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_bytes)
        router.setsockopt(zmq.SNDHWM, 10000)
        router.setsockopt(zmq.RCVHWM, 10000)
        if self.config.keys_dir is not None:
            from zmq.auth import load_certificate

            pub, sec = load_certificate(str(Path(self.config.keys_dir) / "server.key_secret"))
            if self.config.authorized_clients is not None:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self._ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(self.config.authorized_clients))
            router.curve_secretkey = sec
            router.curve_publickey = pub
            router.curve_server = True
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
            router.setsockopt(zmq.IPV6, 1)
        if self.config.port == 0:
            router.bind_to_random_port(f"tcp://{host}")
        else:
            router.bind(f"tcp://{host}:{self.config.port}")
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self._inproc)
        return router, pull

    def start_background(self, timeout: float = 30.0) -> str:
        """Run the socket loop on a thread; returns the bound endpoint (tests, embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name="gen3d-socket", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("server did not start")
        if self._startup_error is not None:
            raise self._startup_error
        return self.endpoint  # type: ignore[return-value]

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def serve_forever(self) -> None:
        try:
            router, pull = self._bind()
        except BaseException as exc:  # noqa: BLE001 - reported to the starter
            self._startup_error = exc
            self._ready.set()
            if self._thread is None:
                raise
            return
        self._worker = threading.Thread(target=self._worker_loop, name="gen3d-worker", daemon=True)
        self._worker.start()
        self._ready.set()
        if self.announce is not None:
            self.announce(self.endpoint)
        log.info("listening on %s (device %s, preset %s, jobs in %s)", self.endpoint, self.device, self.config.preset, self.jobs_dir)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    events = dict(poller.poll(100))
                except zmq.ZMQError as exc:  # interrupted system call and the like
                    if exc.errno == zmq.ETERM:
                        break
                    continue
                if pull in events:
                    for _ in range(256):
                        try:
                            frames = pull.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            self._forward(router, frames)
                        except Exception:  # noqa: BLE001 - the loop must survive anything
                            log.exception("could not forward a job event")
                if router in events:
                    for _ in range(256):
                        try:
                            # zero-copy frames: a header over the limit is refused before Python copies it
                            parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        # with CURVE and ZAP the client's public key is known
                        user_id = _user_id(parts[-1]) if self._auth is not None else None
                        frames = [parts[0].bytes] + [f.buffer for f in parts[1:]]
                        del parts
                        try:
                            self._handle_frames(router, frames, user_id)
                        except Exception:  # noqa: BLE001 - the loop must survive anything
                            log.exception("unexpected error around a request")
        finally:
            self._stop.set()
            with self._lock:
                for job in self._jobs.values():
                    job.cancel.set()
            if self._worker is not None:
                self._worker.join(10.0)
            router.close(0)
            pull.close(0)
            if self._auth is not None:
                self._auth.stop()
            if self._own_ctx:
                self._ctx.term()
            log.info("stopped")

    # -- sending ----------------------------------------------------------------
    @staticmethod
    def _send(router: zmq.Socket, identity: bytes | None, envelope: bool, frames: list) -> None:
        if identity is None:
            return
        head = [identity, b""] if envelope else [identity]
        try:
            router.send_multipart(head + list(frames), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # peer gone or its queue full: the result stays fetchable
            log.debug("could not send to a client: %s", exc)

    def _forward(self, router: zmq.Socket, frames: list[bytes]) -> None:
        job_id = frames[0].decode()
        with self._lock:
            job = self._jobs.get(job_id)
            identity, envelope = (job.identity, job.envelope) if job else (None, False)
        self._send(router, identity, envelope, frames[1:])

    # -- requests ---------------------------------------------------------------
    def _handle_frames(self, router: zmq.Socket, frames: list, user_id: str | None = None) -> None:
        self.counters["requests"] += 1
        identity, body = bytes(frames[0]), frames[1:]
        envelope = False
        if body and len(body[0]) == 0:  # REQ-style envelope
            envelope, body = True, body[1:]
        req = _salvage_req(body)
        try:
            msg = P.decode(body, expect=P.REQUEST_TYPES)
            req = msg.get("req")
            owner = owner_key(msg.get("client"), identity, user_id)
            handler = getattr(self, "_on_" + msg.type)
            handler(router, identity, envelope, msg, owner)
        except ProtocolError as exc:
            self.counters["bad_messages"] += 1
            log.info("rejected a request: [%s] %s", exc.code, exc.message[:500])
            self._send_error(router, identity, envelope, exc.code, exc.message, req=req)
        except Exception:  # noqa: BLE001 - the loop must survive anything
            ref = uuid.uuid4().hex[:8]
            log.exception("internal error while handling a request (ref %s)", ref)
            self._send_error(router, identity, envelope, ErrorCode.INTERNAL,
                             f"internal error while handling the request (the server's log has the details, ref {ref})", req=req)

    def _send_error(self, router, identity, envelope, code: str, message: str, job: str | None = None,
                    req: str | None = None) -> None:
        try:
            self._send(router, identity, envelope, P.error(code, self.scrub(message), job=job, req=req))
        except Exception:  # noqa: BLE001
            log.exception("could not send an error reply")

    def scrub(self, text: str) -> str:
        """An error text as a client may see it: no absolute paths (the jobs folder, the
        models' folders), no object addresses; the server's log keeps the full text."""
        return scrub_message(text, self.jobs_dir)

    def _on_ping(self, router, identity, envelope, msg: P.Message, owner: str) -> None:
        self._send(router, identity, envelope, P.pong(time.time(), req=msg.get("req")))

    def capabilities(self) -> dict:
        return {
            "protocol": P.PROTOCOL_VERSION,
            "server": _package_version(),
            "job_kinds": self.registry.describe(),
            "presets": _preset_names(),
            "preset": self.config.preset,
            "models": self.models.describe() if hasattr(self.models, "describe") else None,
            "device": dev.device_info(self.device),
            "renderer": _renderer_info(self.device),
            "versions": dev.versions(),
            "limits": {
                "max_message_bytes": self.config.limits.max_message_bytes,
                "max_image_pixels": self.config.limits.max_image_pixels,
                "max_job_pixels": self.config.limits.max_job_pixels,
                "max_queue": self.config.max_queue,
            },
            "curve": self.config.keys_dir is not None,
            "shared_jobs": self.config.shared_jobs,
        }

    def _on_capabilities(self, router, identity, envelope, msg: P.Message, owner: str) -> None:
        self._send(router, identity, envelope, P.capabilities_reply(self.capabilities(), req=msg.get("req")))

    def _on_submit(self, router, identity, envelope, msg: P.Message, owner: str) -> None:
        req = msg.get("req")
        kind = msg.get("kind")
        with self._lock:
            dup = self._by_req.get((owner, req)) if req else None
        if dup is not None:  # a retried submit (the client never saw the reply): the same job
            job, rec = self._lookup(dup, owner)
            if rec is not None:
                if rec["state"] in (P.QUEUED, P.RUNNING) and job is not None:
                    with self._lock:  # its events now go to the new socket
                        job.identity, job.envelope = identity, envelope
                    self._send(router, identity, envelope, P.accepted(job.id, job.kind, self._queue.qsize(), req=req))
                else:  # finished: its terminal message, as fetch would answer
                    self._send(router, identity, envelope, self._terminal_frames(dup, rec, req))
                return
        spec = self.registry.get(kind)
        if spec is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_KIND, f"this server does not run {P.quote(kind)} jobs; it offers {self.registry.kinds()}"
            )
        inputs = spec.validate(msg.get("params"), msg.attachments, self.config.limits)
        job = Job(id=uuid.uuid4().hex, kind=kind, params=inputs.params, inputs=inputs, identity=identity, envelope=envelope,
                  req=req, owner=owner)
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise ProtocolError(
                    ErrorCode.QUEUE_FULL, f"the job queue is full ({self.config.max_queue} waiting); try again later"
                ) from None
            self._jobs[job.id] = job
            if req:
                self._by_req[(owner, req)] = job.id
                while len(self._by_req) > MAX_REQ_IDS:
                    self._by_req.popitem(last=False)
            self._evict_locked()
        self._persist(job)
        log.info("job %s (%s) queued", job.id, kind)
        self._send(router, identity, envelope, P.accepted(job.id, kind, self._queue.qsize(), req=req))

    def _visible(self, rec_owner: str | None, owner: str) -> bool:
        return self.config.shared_jobs or (rec_owner is not None and rec_owner == owner)

    def _lookup(self, job_id: str, owner: str) -> tuple[Job | None, dict | None]:
        """The in-memory job, or its record on disk, or (None, None); only the caller's own
        jobs (every job in shared mode)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            rec = job.record()
        elif not JOB_ID_RE.match(job_id):
            return None, None
        else:
            try:
                rec = json.loads((self.jobs_dir / job_id / "job.json").read_text())
            except (OSError, ValueError):
                return None, None
            if not isinstance(rec, dict) or not isinstance(rec.get("state"), str):
                return None, None
        if not self._visible(rec.get("owner"), owner):
            return None, None
        return job, rec

    def _no_job(self, job_id: str, owner: str) -> ProtocolError:
        with self._lock:
            expired = job_id in self._expired and self._visible(self._expired[job_id], owner)
        if expired:
            return ProtocolError(ErrorCode.EXPIRED, f"job {job_id} finished and has been removed (the server keeps its "
                                 f"last {self.config.keep_jobs} jobs); submit it again")
        return ProtocolError(ErrorCode.UNKNOWN_JOB, f"no job {P.quote(job_id)}")

    def _on_cancel(self, router, identity, envelope, msg: P.Message, owner: str) -> None:
        job_id, req = msg.get("job"), msg.get("req")
        job, rec = self._lookup(job_id, owner)
        if rec is None:
            raise self._no_job(job_id, owner)
        if job is None or rec["state"] in (P.DONE, P.FAILED, P.CANCELLED_STATE):
            raise ProtocolError(ErrorCode.NOT_CANCELLABLE, f"job {job_id} is already {rec['state']}")
        notify = False
        with self._lock:
            job.cancel.set()
            if job.state == P.QUEUED:
                job.state = P.CANCELLED_STATE
                job.finished = time.time()
                job.inputs = None
                notify = True
                self.counters["jobs_cancelled"] += 1
        if notify:
            self._persist(job)
            log.info("job %s cancelled while queued", job.id)
            self._send(router, job.identity, job.envelope, P.cancelled(job.id))
        else:
            log.info("job %s: cancel requested", job.id)
        self._send(router, identity, envelope, status_frames(public_record(job.record()), req))

    def _server_status(self, owner: str) -> dict:
        with self._lock:
            job = self._running_job
            running = job.id if job is not None and self._visible(job.owner, owner) else None
            states: dict[str, int] = {}
            for j in self._jobs.values():
                states[j.state] = states.get(j.state, 0) + 1
        return {
            "uptime": time.time() - self._started_at,
            "queued": self._queue.qsize(),
            "running": running,  # the running job's id when it is the caller's
            "busy": job is not None,
            "jobs": states,
            "counters": dict(self.counters),
            "memory": dev.memory_info(self.device),
            "preset": self.config.preset,
        }

    def _on_status(self, router, identity, envelope, msg: P.Message, owner: str) -> None:
        job_id = msg.get("job")
        if job_id is None:
            info = self._server_status(owner)
        else:
            _, rec = self._lookup(job_id, owner)
            if rec is None:
                raise self._no_job(job_id, owner)
            info = public_record(rec)
        self._send(router, identity, envelope, status_frames(info, msg.get("req")))

    def _terminal_frames(self, job_id: str, rec: dict, req: str | None) -> list:
        """The terminal message of a finished job (result, error or cancelled), for fetch and for
        a retried submit."""
        state = rec["state"]
        if state == P.CANCELLED_STATE:
            return P.cancelled(job_id, req=req)
        if state == P.FAILED:
            err = rec.get("error") if isinstance(rec.get("error"), dict) else {}
            return P.error(str(err.get("code", ErrorCode.JOB_FAILED)), self.scrub(str(err.get("message", ""))), job=job_id, req=req)
        atts = []
        for r in rec.get("results", []):
            path = self.jobs_dir / job_id / "result" / _safe_name(str(r.get("name", "")))
            try:
                atts.append(Attachment(path.name, str(r.get("mime", "application/octet-stream")), path.read_bytes()))
            except OSError as exc:
                log.warning("job %s: result file unreadable: %s", job_id, exc)
                raise ProtocolError(ErrorCode.EXPIRED, f"the result files of job {job_id} are no longer on the server; "
                                    "submit it again") from None
        metadata = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        return P.result(job_id, metadata, atts, req=req)

    def _on_fetch(self, router, identity, envelope, msg: P.Message, owner: str) -> None:
        job_id, req, watch = msg.get("job"), msg.get("req"), msg.get("watch", False)
        job, rec = self._lookup(job_id, owner)
        if rec is None:
            raise self._no_job(job_id, owner)
        state = rec["state"]
        if state in (P.QUEUED, P.RUNNING) and job is not None:
            if not watch:
                raise ProtocolError(ErrorCode.NOT_READY, f"job {job_id} is {state}; fetch it when it is done")
            with self._lock:  # re-attach: the job's events now go to this client (its owner)
                job.identity, job.envelope = identity, envelope
            self._send(router, identity, envelope, status_frames(public_record(job.record()), req))
            return
        self._send(router, identity, envelope, self._terminal_frames(job_id, rec, req))

    # -- bookkeeping ------------------------------------------------------------
    def _evict_locked(self) -> None:
        if len(self._jobs) <= MAX_JOBS_IN_MEMORY:
            return
        for job_id in list(self._jobs):
            if len(self._jobs) <= MAX_JOBS_IN_MEMORY:
                break
            if self._jobs[job_id].state in (P.DONE, P.FAILED, P.CANCELLED_STATE):
                del self._jobs[job_id]  # its record stays on disk

    def _job_dir(self, job: Job) -> Path:
        return self.jobs_dir / job.id

    def _persist(self, job: Job) -> None:
        """Write the job's current record (serialised, so the newest state wins)."""
        with self._persist_lock:
            try:
                d = self._job_dir(job)
                d.mkdir(parents=True, exist_ok=True)
                tmp = d / "job.json.tmp"
                tmp.write_text(json.dumps(job.record(), indent=1, default=str))
                os.replace(tmp, d / "job.json")
            except OSError as exc:  # a full disk must not take the service down
                log.error("could not write the record of job %s: %s", job.id, exc)

    def _prune_disk(self) -> None:
        try:
            dirs = [p for p in self.jobs_dir.iterdir() if p.is_dir() and JOB_ID_RE.match(p.name)]
        except OSError:
            return
        if len(dirs) <= self.config.keep_jobs:
            return
        with self._lock:
            live = {j.id for j in self._jobs.values() if j.state in (P.QUEUED, P.RUNNING)}
        dirs.sort(key=lambda p: p.stat().st_mtime)
        gone = []
        for p in dirs[: len(dirs) - self.config.keep_jobs]:
            if p.name in live:
                continue
            try:
                owner = json.loads((p / "job.json").read_text()).get("owner")
            except (OSError, ValueError, AttributeError):
                owner = None
            shutil.rmtree(p, ignore_errors=True)
            gone.append({"id": p.name, "owner": owner})
        if gone:
            self._remember_expired(gone)

    def _remember_expired(self, entries: list[dict]) -> None:
        with self._lock:
            for e in entries:
                self._expired[e["id"]] = e["owner"]
            while len(self._expired) > MAX_EXPIRED:
                self._expired.popitem(last=False)
            keep = [{"id": k, "owner": v} for k, v in self._expired.items()]
        path = self.jobs_dir / EXPIRED_FILE
        try:
            if path.is_file() and path.stat().st_size > 200 * MAX_EXPIRED:  # compact now and then
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
                os.replace(tmp, path)
            else:
                with open(path, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(e) + "\n" for e in entries)
        except OSError as exc:
            log.warning("could not record pruned jobs: %s", exc)

    # -- worker -----------------------------------------------------------------
    def _worker_loop(self) -> None:
        if str(self.device).startswith("cuda"):
            # decide gsplat vs the PyTorch renderer before the first job (a first
            # gsplat use may compile its kernels for minutes); capabilities reads it
            _renderer_info(self.device, check=True)
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._inproc)
        try:
            while not self._stop.is_set():
                try:
                    job = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                with self._lock:
                    if job.state != P.QUEUED:
                        continue  # cancelled while waiting
                    job.state = P.RUNNING
                    job.started = time.time()
                    self._running_job = job
                terminal: list | None = None
                try:
                    terminal = self._run_job(job, push)
                except Exception as exc:  # noqa: BLE001 - bookkeeping failed; keep serving
                    log.exception("worker error around job %s", job.id)
                    terminal = P.error(ErrorCode.INTERNAL, self.scrub(f"{type(exc).__name__}: {exc}"), job=job.id)
                finally:
                    with self._lock:
                        self._running_job = None
                    # the job's memory is given back before its end is announced
                    dev.free_memory(self.device)
                    if terminal is not None:
                        push.send_multipart([job.id.encode()] + terminal, copy=False)
                    self._prune_disk()
        finally:
            push.close(0)

    def _run_job(self, job: Job, push: zmq.Socket) -> list:
        """Run one job; returns the frames of its terminal message (sent by the caller)."""
        spec = self.registry.get(job.kind)
        assert spec is not None
        jid = job.id.encode()
        log.info("job %s (%s) started", job.id, job.kind)
        self._persist(job)

        def sink(stage: str, fraction: float, stage_fraction: float, message: str, preview: bytes | None) -> None:
            job.stage, job.fraction, job.message = stage, fraction, message
            push.send_multipart([jid] + P.progress(job.id, stage, fraction, message, preview, stage_fraction))

        workdir = self._job_dir(job) / "work"
        ctx = JobContext(Progress(sink, job.cancel.is_set), self.device, self.models, workdir, self.config.limits)
        inputs, job.inputs = job.inputs, None
        t0 = time.perf_counter()
        try:
            out = spec.handler(inputs, ctx)
            del inputs
            result_dir = self._job_dir(job) / "result"
            result_dir.mkdir(parents=True, exist_ok=True)
            for att in out.attachments:
                (result_dir / _safe_name(att.name)).write_bytes(att.data)
            metadata = dict(out.metadata)
            metadata.setdefault("seconds", time.perf_counter() - t0)
            with self._lock:
                job.metadata = metadata
                job.results = [{"name": _safe_name(a.name), "mime": a.mime, "size": len(a.data)} for a in out.attachments]
                job.state, job.finished, job.fraction = P.DONE, time.time(), 1.0
                self.counters["jobs_done"] += 1
            self._persist(job)  # on disk before it is sent
            frames = P.result(job.id, metadata, [Attachment(_safe_name(a.name), a.mime, a.data) for a in out.attachments])
            del out
            log.info("job %s done in %.2f s", job.id, time.perf_counter() - t0)
        except Cancelled:
            with self._lock:
                job.state, job.finished = P.CANCELLED_STATE, time.time()
                self.counters["jobs_cancelled"] += 1
            self._persist(job)
            frames = P.cancelled(job.id)
            log.info("job %s cancelled after %.2f s", job.id, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - a job may raise anything; the worker goes on
            if dev.is_out_of_memory(exc):
                code = ErrorCode.OUT_OF_MEMORY
                text = f"out of memory on {self.device} in stage '{job.stage}': {exc}. Try a smaller texture size, fewer views or faces, or the low-memory option."
            elif isinstance(exc, JobError):
                code, text = exc.code, str(exc)
            else:
                code, text = ErrorCode.JOB_FAILED, f"{type(exc).__name__}: {exc}"
            log.warning("job %s failed: [%s] %s\n%s", job.id, code, text, traceback.format_exc())
            text = self.scrub(text)
            with self._lock:
                job.state, job.finished = P.FAILED, time.time()
                job.error_code, job.error_message = code, text
                self.counters["jobs_failed"] += 1
            self._persist(job)
            frames = P.error(code, text, job=job.id)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return frames


def _safe_name(name: str) -> str:
    name = os.path.basename(name).strip() or "result.bin"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:128]


def owner_key(token: str | None, identity: bytes, user_id: str | None = None) -> str:
    """Who a request comes from, as stored with its jobs: a hash of the client's token (stable
    across reconnects) or, without one, of its connection's identity; with CURVE and ZAP the
    client's public key is part of it. The token itself is never stored."""
    basis = f"t:{token}" if token else f"c:{bytes(identity).hex()}"
    if user_id:
        basis = f"k:{user_id}|{basis}"
    return hashlib.sha256(basis.encode()).hexdigest()[:32]


def _user_id(frame) -> str | None:
    try:
        return frame.get("User-Id") or None
    except Exception:  # noqa: BLE001 - no ZAP metadata on this message
        return None


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")
_POSIX_PATH = re.compile(r"(?<![\w.:/~-])(?:~|/[\w.@+-]+)(?:/[\w.@+-]+)+/?")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\s'\"\\]+\\)*[^\s'\"\\]*")


def scrub_message(text: str, jobs_dir: Path | None = None) -> str:
    """``text`` without the server's absolute paths (each becomes its last component) and
    without Python object addresses."""
    text = str(text)
    if jobs_dir is not None:
        for root in {str(jobs_dir), str(Path(jobs_dir).resolve())}:
            text = text.replace(root + os.sep, "/").replace(root, "<jobs>")  # then cut like any path
    text = _ADDRESS.sub("", text)
    text = _POSIX_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    return _WINDOWS_PATH.sub(lambda m: m.group(0).rstrip("\\").rsplit("\\", 1)[-1], text)


def _brief(value: Any, limit: int = 256) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
        if len(text) > 4 * limit:
            return f"<{type(value).__name__} of {len(value)} items>"
    return value


def public_record(rec: dict) -> dict:
    """A job record as a status reply shows it: no owner or request id, long parameters cut
    (the full record stays in the job's folder)."""
    out = {("job" if k == "id" else k): v for k, v in rec.items() if k not in ("owner", "req")}
    if isinstance(out.get("params"), dict):
        out["params"] = {k: _brief(v) for k, v in out["params"].items()}
    return out


def status_frames(info: dict, req: str | None) -> list:
    """A status reply that always encodes: what does not fit the header limit is left out."""
    try:
        return P.status_reply(info, req=req)
    except ValueError:
        pass
    slim = {k: v for k, v in info.items() if k not in ("params", "metadata", "results")}
    slim["truncated"] = True
    try:
        return P.status_reply(slim, req=req)
    except ValueError:
        return P.error(ErrorCode.INTERNAL, "the status of this job does not fit in a reply", req=req)


def _salvage_req(body: list) -> str | None:
    """The request id of a message that failed validation, when it can be read cheaply."""
    try:
        if len(body[0]) > P.MAX_HEADER_BYTES:  # never parse what decode would refuse
            return None
        hdr = json.loads(bytes(body[0]).decode("utf-8"))
        req = hdr.get("req")
        return req if isinstance(req, str) and len(req) <= 256 else None
    except Exception:  # noqa: BLE001
        return None


def _package_version() -> str:
    from .. import __version__

    return __version__


def _preset_names() -> list[str]:
    from ..models.presets import PRESETS

    return list(PRESETS)


def _renderer_info(device: str, check: bool = False) -> dict:
    """Which Gaussian rasterizer jobs use on ``device`` (never compiles gsplat unless ``check``)."""
    from ..gaussians.render import renderer_info

    return renderer_info(device, check=check)
