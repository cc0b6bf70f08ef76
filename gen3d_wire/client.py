"""DEALER client for the gen3d backend, shared by the CLI, the tests and the add-on.

Needs pyzmq and the standard library only (no bpy, no torch).

Two ways to use it:

* blocking calls for scripts: :meth:`Client.ping`, :meth:`Client.capabilities`,
  :meth:`Client.run` (submit, stream progress to a callback, return the result);
* :class:`JobWatcher` for event loops that must never block (Blender's timers):
  ``start()`` sends, ``poll()`` returns whatever arrived, ``cancel()`` asks to stop.

Reliability follows the "Lazy Pirate" habit: every wait has a timeout, and a
socket that timed out is closed with LINGER 0 and replaced, never reused.
Submits carry a request id the server de-duplicates, so a retried submit never
starts a second job.

Jobs belong to the client that submitted them: every request carries this
client's token (``client``). By default all clients of one process share a
random token, so a reconnected socket still reaches its jobs; pass ``token`` (or
set ``GEN3D_CLIENT_TOKEN``) to reach them from another process, as the Blender
add-on does with the token it keeps in its preferences.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import zmq

from . import protocol as P

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


class BackendError(Exception):
    """An ``error`` reply, or a failure to reach the backend."""

    def __init__(self, code: str, message: str, job: str | None = None):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.job = job


class Unreachable(BackendError):
    def __init__(self, endpoint: str, timeout: float, what: str = "request"):
        super().__init__(
            "unreachable",
            f"no answer from the backend at {endpoint} within {timeout:g} s ({what}). "
            "Is it running? Start it with: python -m backend serve",
        )


class JobCancelled(BackendError):
    def __init__(self, job: str):
        super().__init__("cancelled", f"job {job} was cancelled", job)


_counter = itertools.count()
_prefix = uuid.uuid4().hex[:8]


def new_req() -> str:
    return f"{_prefix}-{os.getpid()}-{next(_counter)}"


_PROCESS_TOKEN = secrets.token_urlsafe(24)


def new_token() -> str:
    """A fresh client token (32 URL-safe characters): whoever holds it can see the jobs submitted with it."""
    return secrets.token_urlsafe(24)


def default_token() -> str:
    env = os.environ.get("GEN3D_CLIENT_TOKEN", "").strip()
    return env if env else _PROCESS_TOKEN


@dataclass
class CurveKeys:
    """CurveZMQ settings for a client: the server's public key (Z85, 40 chars)
    and optionally this client's own key pair (generated when absent)."""

    server_public: str
    public: str | None = None
    secret: str | None = None

    @classmethod
    def from_files(cls, server_public_file: str, client_secret_file: str | None = None) -> "CurveKeys":
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(server_public_file)
        pub = sec = None
        if client_secret_file:
            pub_b, sec_b = zmq.auth.load_certificate(client_secret_file)
            pub, sec = pub_b.decode(), sec_b.decode() if sec_b else None
        return cls(server_public.decode(), pub, sec)


class Client:
    """One DEALER socket to one backend endpoint. Not thread-safe: use one per thread."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = 10.0,
        curve: CurveKeys | None = None,
        max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context | None = None,
        token: str | None = None,
    ):
        self.token = token or default_token()
        if not P.TOKEN_RE.match(self.token):
            raise ValueError("a client token is 16-128 letters, digits, '-' or '_'")
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.curve = curve
        self.max_message_bytes = max_message_bytes
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._pending: deque[P.Message] = deque()
        self.bad_replies = 0
        self._connect()

    # -- socket lifecycle ---------------------------------------------------
    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, 10000)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve is not None:
            pub, sec = self.curve.public, self.curve.secret
            if not (pub and sec):
                pub_b, sec_b = zmq.curve_keypair()
                pub, sec = pub_b.decode(), sec_b.decode()
            sock.curve_serverkey = self.curve.server_public.encode()
            sock.curve_publickey = pub.encode()
            sock.curve_secretkey = sec.encode()
        sock.connect(self.endpoint)
        self._sock = sock

    def reset(self) -> None:
        """Drop the socket (LINGER 0) and open a fresh one: the Lazy Pirate step."""
        if self._sock is not None:
            self._sock.close(linger=0)
        self._pending.clear()
        self._connect()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- raw I/O ------------------------------------------------------------
    def send(self, frames: Sequence[bytes]) -> None:
        assert self._sock is not None, "client is closed"
        try:
            self._sock.send_multipart(list(frames), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # IMMEDIATE=1 and no connection yet: wait briefly for one rather than queue forever
            if not self._sock.poll(int(self.timeout * 1000), zmq.POLLOUT):
                raise Unreachable(self.endpoint, self.timeout, "send") from None
            self._sock.send_multipart(list(frames), copy=False)

    def recv(self, timeout: float) -> P.Message | None:
        """Next message (from the buffer first), or None after ``timeout`` seconds.
        Undecodable messages are skipped (counted in ``bad_replies``)."""
        if self._pending:
            return self._pending.popleft()
        assert self._sock is not None, "client is closed"
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not self._sock.poll(int(left * 1000), zmq.POLLIN):
                return None
            frames = self._sock.recv_multipart()
            try:
                return P.decode(frames, expect=P.REPLY_TYPES)
            except P.ProtocolError:
                self.bad_replies += 1

    def poll(self, timeout: float = 0.0) -> list[P.Message]:
        """Everything that has arrived (waiting up to ``timeout`` for the first)."""
        out = []
        msg = self.recv(timeout)
        while msg is not None:
            out.append(msg)
            msg = self.recv(0)
        return out

    def _wait(self, match: Callable[[P.Message], bool], timeout: float, what: str) -> P.Message:
        """Wait for a matching message, buffering the others for later."""
        deadline = time.monotonic() + timeout
        skipped: list[P.Message] = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unreachable(self.endpoint, timeout, what)
                msg = self.recv(left) if not self._pending else self._pending.popleft()
                if msg is None:
                    continue
                if match(msg):
                    return msg
                skipped.append(msg)
        finally:
            self._pending.extendleft(reversed(skipped))

    def request(self, frames: Sequence[bytes], req: str, timeout: float | None = None, what: str = "request") -> P.Message:
        """Send a request and wait for the reply with the same ``req``.
        On timeout the socket is replaced and :class:`Unreachable` raised."""
        timeout = self.timeout if timeout is None else timeout
        self.send(frames)
        try:
            msg = self._wait(lambda m: m.get("req") == req, timeout, what)
        except Unreachable:
            self.reset()
            raise
        if msg.type == P.ERROR:
            raise BackendError(msg.get("code"), msg.get("message"), msg.get("job"))
        return msg

    # -- blocking API ---------------------------------------------------------
    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time in seconds."""
        req = new_req()
        t0 = time.perf_counter()
        self.request(P.ping(req, self.token), req, timeout, "ping")
        return time.perf_counter() - t0

    def capabilities(self, timeout: float | None = None) -> dict:
        req = new_req()
        msg = self.request(P.capabilities_request(req, self.token), req, timeout, "capabilities")
        return _strip(msg.header)

    def status(self, job: str | None = None, timeout: float | None = None) -> dict:
        req = new_req()
        msg = self.request(P.status(job, req, self.token), req, timeout, "status")
        return _strip(msg.header)

    def submit(self, kind: str, params: Mapping[str, Any] | None = None, attachments: Sequence[P.Attachment] = (), timeout: float | None = None) -> str:
        """Submit a job; returns its id once the server accepted it.
        Retries once on a fresh socket with the same request id (the server
        de-duplicates), so a lost reply never starts the job twice."""
        req = new_req()
        frames = P.submit(kind, params, attachments, req, self.token)
        try:
            msg = self.request(frames, req, timeout, "submit")
        except Unreachable:
            msg = self.request(frames, req, timeout, "submit (retry)")
        if msg.type in P.TERMINAL_TYPES:  # the job had already finished: its end is the first event
            self._pending.appendleft(P.Message({k: v for k, v in msg.header.items() if k != "req"}, msg.attachments))
        return msg.get("job")

    def cancel(self, job: str) -> None:
        """Ask the server to cancel; the job's stream ends with ``cancelled``."""
        self.send(P.cancel(job, new_req(), self.token))

    def fetch(self, job: str, timeout: float | None = None) -> P.Message:
        """The stored result of a finished job (raises BackendError otherwise)."""
        req = new_req()
        msg = self.request(P.fetch(job, False, req, self.token), req, timeout, "fetch")
        if msg.type == P.CANCELLED:
            raise JobCancelled(job)
        return msg

    def events(self, job: str, idle_timeout: float | None = None) -> Iterable[P.Message]:
        """Yield the job's progress events and finally its terminal message.

        When nothing arrives for ``idle_timeout`` seconds the client checks the
        job with ``status``; if the server does not answer, it reconnects and
        re-attaches to the job (``fetch`` with ``watch``)."""
        idle = self.timeout if idle_timeout is None else idle_timeout
        watch_reqs: set[str] = set()

        def mine(m: P.Message) -> bool:
            # the job's own stream (no req), or replies to our re-attach requests
            return m.get("job") == job and (m.get("req") is None or m.get("req") in watch_reqs) and m.type != P.STATUS

        while True:
            try:
                msg = self._wait(mine, idle, "job events")
            except Unreachable:
                # Silence: is the server still there? status answers even mid-job.
                try:
                    info = self.status(job)
                except Unreachable:
                    info = {"state": None}  # socket was replaced: re-attach below
                if info.get("state") in (None, P.DONE, P.FAILED, P.CANCELLED_STATE):
                    req = new_req()
                    watch_reqs.add(req)
                    self.send(P.fetch(job, True, req, self.token))
                continue
            yield msg
            if msg.type in P.TERMINAL_TYPES:
                return

    def run(
        self,
        kind: str,
        params: Mapping[str, Any] | None = None,
        attachments: Sequence[P.Attachment] = (),
        on_progress: Callable[[P.Message], None] | None = None,
        idle_timeout: float | None = None,
        on_accepted: Callable[[str], None] | None = None,
    ) -> P.Message:
        """Submit, stream progress to ``on_progress``, return the ``result`` message.
        Raises :class:`BackendError` (``error``) or :class:`JobCancelled`."""
        job = self.submit(kind, params, attachments)
        if on_accepted:
            on_accepted(job)
        for msg in self.events(job, idle_timeout):
            if msg.type == P.PROGRESS:
                if on_progress:
                    on_progress(msg)
            elif msg.type == P.RESULT:
                return msg
            elif msg.type == P.ERROR:
                raise BackendError(msg.get("code"), msg.get("message"), job)
            elif msg.type == P.CANCELLED:
                raise JobCancelled(job)
        raise BackendError(P.ErrorCode.INTERNAL, "job stream ended without a result", job)


def _is_terminal_for(msg: P.Message, job: str) -> bool:
    return msg.type in P.TERMINAL_TYPES and msg.get("job") == job


def _strip(header: Mapping[str, Any]) -> dict:
    return {k: v for k, v in header.items() if k not in ("v", "type", "req", "attachments")}


@dataclass
class JobEvent:
    """What :meth:`JobWatcher.poll` reports, ready for a UI."""

    kind: str  # "accepted" | "progress" | "result" | "error" | "cancelled"
    job: str | None = None
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    preview_png: bytes | None = None
    code: str = ""
    metadata: dict = field(default_factory=dict)
    attachments: dict[str, bytes] = field(default_factory=dict)


class JobWatcher:
    """Non-blocking life of one job, for event loops (Blender timers).

    ``start()`` sends the submit and returns at once; call ``poll()`` often: it
    never waits, and returns the events that arrived. If the server does not
    accept the job within ``timeout`` seconds, ``poll`` reports an ``error``
    event with code ``unreachable``. ``done`` turns true after the terminal
    event."""

    def __init__(
        self,
        endpoint: str,
        kind: str,
        params: Mapping[str, Any] | None = None,
        attachments: Sequence[P.Attachment] = (),
        timeout: float = 10.0,
        curve: CurveKeys | None = None,
        silence_timeout: float = 120.0,
        client: Client | None = None,
        token: str | None = None,
    ):
        # an already-connected client can be handed in: its first send does not wait for a connection
        self.client = client if client is not None else Client(endpoint, timeout=timeout, curve=curve, token=token)
        self.kind = kind
        self.params = dict(params or {})
        self.attachments = list(attachments)
        self.timeout = timeout
        self.silence_timeout = silence_timeout
        self.job: str | None = None
        self.done = False
        self.cancel_requested = False
        self._req = new_req()
        self._sent_at = 0.0
        self._last_heard = 0.0
        self._status_req: str | None = None
        self._status_sent_at = 0.0
        self._watch_reqs: set[str] = set()

    def start(self) -> None:
        try:
            self.client.send(P.submit(self.kind, self.params, self.attachments, self._req, self.client.token))
        except BackendError:
            self._sent_at = time.monotonic() - self.timeout  # poll() reports it at once
            return
        self._sent_at = self._last_heard = time.monotonic()

    def attach(self, job: str) -> None:
        """Follow a job submitted earlier (by its id) instead of submitting one: ``fetch`` with
        ``watch`` re-attaches this client to it while it runs, or is answered with its result (or
        its end) when it is over. The job must belong to this client's token."""
        self.job = job
        try:
            self.client.send(P.fetch(job, True, self._req, self.client.token))
        except BackendError:
            self._sent_at = self._last_heard = time.monotonic() - self.timeout  # poll() asks for status at once
            return
        self._sent_at = self._last_heard = time.monotonic()

    def cancel(self) -> None:
        self.cancel_requested = True
        if self.job is not None and not self.done:
            try:
                self.client.send(P.cancel(self.job, new_req(), self.client.token))
            except BackendError:
                pass

    def close(self) -> None:
        self.client.close()

    def poll(self) -> list[JobEvent]:
        if self.done:
            return []
        events: list[JobEvent] = []
        try:
            messages = self.client.poll(0)
        except P.ProtocolError as exc:
            self.done = True
            return [JobEvent("error", self.job, code=exc.code, message=f"bad reply from backend: {exc.message}")]
        now = time.monotonic()
        if messages:
            self._last_heard = now
        for msg in messages:
            ev = self._handle(msg)
            if ev is not None:
                events.append(ev)
                if ev.kind in P.TERMINAL_TYPES:
                    self.done = True
                    self.client.close()
                    return events
        if self.job is None and now - self._sent_at > self.timeout:
            self.done = True
            self.client.close()
            err = Unreachable(self.client.endpoint, self.timeout, "submit")
            events.append(JobEvent("error", None, code=err.code, message=err.message))
        elif self.job is not None and now - self._last_heard > self.timeout:
            # quiet for a while: ask for status; if even that is unanswered for
            # silence_timeout, give up with an error event (job id kept for fetch)
            if self._status_req is None:
                self._status_req = new_req()
                self._status_sent_at = now
                try:
                    self.client.send(P.status(self.job, self._status_req, self.client.token))
                except BackendError:
                    pass
            elif now - self._status_sent_at > self.silence_timeout:
                self.done = True
                self.client.close()
                err = Unreachable(self.client.endpoint, self.silence_timeout, f"job {self.job}")
                events.append(JobEvent("error", self.job, code=err.code, message=err.message))
        return events

    def _handle(self, msg: P.Message) -> JobEvent | None:
        t = msg.type
        req = msg.get("req")
        if req is not None and req not in (self._req, self._status_req) and req not in self._watch_reqs:
            return None  # a reply to a cancel request or to a stale status
        if msg.get("req") == self._req:
            if t == P.ACCEPTED:
                self.job = msg.get("job")
                if self.cancel_requested:
                    self.cancel()
                return JobEvent("accepted", self.job)
            if t == P.ERROR:
                return JobEvent("error", msg.get("job"), code=msg.get("code"), message=msg.get("message"))
            if t in (P.RESULT, P.CANCELLED) and self.job is None:  # a retried submit of a finished job
                self.job = msg.get("job")
        if self._status_req is not None and msg.get("req") == self._status_req:
            self._status_req = None
            if msg.get("state") in (P.DONE, P.FAILED, P.CANCELLED_STATE):
                # the terminal message was lost: ask for it again
                wreq = new_req()
                self._watch_reqs.add(wreq)
                self.client.send(P.fetch(self.job, True, wreq, self.client.token))
            return None
        if msg.get("job") != self.job or self.job is None or t == P.STATUS:
            return None
        if t == P.PROGRESS:
            prev = msg.attachment("preview")
            return JobEvent("progress", self.job, stage=msg.get("stage"), fraction=msg.get("fraction"),
                            message=msg.get("message", ""), preview_png=prev.data if prev else None)
        if t == P.RESULT:
            return JobEvent("result", self.job, metadata=msg.get("metadata", {}),
                            attachments={a.name: a.data for a in msg.attachments})
        if t == P.ERROR:
            return JobEvent("error", self.job, code=msg.get("code"), message=msg.get("message"))
        if t == P.CANCELLED:
            return JobEvent("cancelled", self.job)
        return None
