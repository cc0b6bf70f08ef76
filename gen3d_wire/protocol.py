"""The gen3d wire format: one source of truth for the backend and every client.

A message is a ZeroMQ multipart message. Frame 0 is a UTF-8 JSON object (the
header); the frames after it are binary attachments, described in order by the
header's ``attachments`` list. Every header carries ``"v"`` (the protocol
version) and ``"type"``. ``docs/protocol.md`` documents all of it for authors of
third-party clients; this module is the executable form of that page.

Only the standard library is used here so that the Blender add-on can ship this
file unchanged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Limits a peer may rely on. The server may lower them (capabilities says).
MAX_HEADER_BYTES = 64 * 1024
MAX_ATTACHMENTS = 1024
MAX_DEPTH = 32  # nesting of arrays/objects in a header
MAX_ERROR_MESSAGE = 2000  # characters of an error reply's message
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096

# Requests (client -> server)
SUBMIT = "submit"
CANCEL = "cancel"
STATUS = "status"
FETCH = "fetch"
PING = "ping"
CAPABILITIES = "capabilities"
REQUEST_TYPES = (SUBMIT, CANCEL, STATUS, FETCH, PING, CAPABILITIES)

# Replies and events (server -> client). ``status`` and ``capabilities``
# replies use the same type name as their request.
ACCEPTED = "accepted"
PROGRESS = "progress"
RESULT = "result"
ERROR = "error"
CANCELLED = "cancelled"
PONG = "pong"
REPLY_TYPES = (ACCEPTED, PROGRESS, RESULT, ERROR, CANCELLED, PONG, STATUS, CAPABILITIES)
# A job's stream ends with exactly one of these.
TERMINAL_TYPES = (RESULT, ERROR, CANCELLED)

# Job states as reported by ``status``.
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED_STATE = "cancelled"
JOB_STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED_STATE)


class ErrorCode:
    """Machine-readable ``code`` values of ``error`` replies."""

    BAD_MESSAGE = "bad_message"  # not a decodable message (frames, JSON, types)
    BAD_VERSION = "bad_version"  # protocol version not supported
    UNKNOWN_TYPE = "unknown_type"  # request type not known
    UNKNOWN_KIND = "unknown_kind"  # job kind not offered by this server
    BAD_PARAMS = "bad_params"  # parameters or attachments invalid for the kind
    TOO_LARGE = "too_large"  # attachment or decoded image over a limit
    QUEUE_FULL = "queue_full"  # try again later
    UNKNOWN_JOB = "unknown_job"  # no such job id
    NOT_READY = "not_ready"  # fetch of a job that has no result (yet)
    NOT_CANCELLABLE = "not_cancellable"  # job already finished
    EXPIRED = "expired"  # the job finished long ago and its record was removed
    BAD_INPUT = "bad_input"  # the job ran and found its input unusable
    MODEL_MISSING = "model_missing"  # weights not on disk and no network
    OUT_OF_MEMORY = "out_of_memory"
    JOB_FAILED = "job_failed"  # any other exception inside a job
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message that cannot be accepted. ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Attachment:
    name: str
    mime: str
    data: bytes

    def describe(self) -> dict:
        return {"name": self.name, "mime": self.mime, "size": len(self.data)}


@dataclass
class Message:
    """A decoded message: the JSON header plus named binary attachments."""

    header: dict
    attachments: list[Attachment] = field(default_factory=list)

    @property
    def type(self) -> str:
        return self.header["type"]

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)

    def attachment(self, name: str) -> Attachment | None:
        for att in self.attachments:
            if att.name == name:
                return att
        return None

    def attachment_map(self) -> dict[str, Attachment]:
        return {a.name: a for a in self.attachments}


# --------------------------------------------------------------------------
# Encoding


def _json_default(obj: Any) -> Any:
    # numpy scalars and similar objects that know how to become Python numbers
    for attr in ("item", "tolist"):
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def encode(header: Mapping[str, Any], attachments: Sequence[Attachment] = ()) -> list[bytes]:
    """Header dict + attachments -> list of frames. Adds ``v`` and ``attachments``."""
    if "type" not in header:
        raise ValueError("header needs a 'type'")
    hdr = dict(header)
    hdr["v"] = PROTOCOL_VERSION
    hdr["attachments"] = [a.describe() for a in attachments]
    # UTF-8, not \u escapes (an emoji is 4 bytes, not 12); a lone surrogate becomes '?'
    raw = json.dumps(hdr, default=_json_default, allow_nan=False, ensure_ascii=False,
                     separators=(",", ":")).encode("utf-8", "replace")
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(raw)} bytes, over the {MAX_HEADER_BYTES} byte limit")
    return [raw] + [a.data for a in attachments]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def quote(value: Any, limit: int = 64) -> str:
    """``repr`` of a value a peer sent, cut to ``limit`` characters: what error messages echo."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:32]} is out of range")
    return v


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _depth_ok(obj: Any, limit: int) -> bool:
    """Arrays/objects nested at most ``limit`` deep (iterative: no recursion to exhaust)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = o.values()
        elif not isinstance(o, list):
            continue
        if d > limit:
            return False
        stack.extend((c, d + 1) for c in o if isinstance(c, (dict, list)))
    return True


# Per-type header fields: name -> (required, check, description of the type)
_STR = (lambda v: isinstance(v, str) and 0 < len(v) <= 256, "a non-empty string of at most 256 characters")
_OPT_STR = (lambda v: v is None or (isinstance(v, str) and len(v) <= 256), "a string or null")
_DICT = (lambda v: isinstance(v, dict), "an object")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_FRACTION = (lambda v: _is_num(v) and 0.0 <= v <= 1.0, "a number in [0, 1]")
_ANY_STR = (lambda v: isinstance(v, str), "a string")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# a client's secret token: jobs belong to the client that submitted them (see docs/protocol.md)
_TOKEN = (lambda v: v is None or (isinstance(v, str) and TOKEN_RE.match(v) is not None),
          "16-128 letters, digits, '-' or '_'")

_SCHEMAS: dict[str, dict[str, tuple[bool, tuple]]] = {
    SUBMIT: {"kind": (True, _STR), "params": (False, _DICT), "req": (False, _OPT_STR), "client": (False, _TOKEN)},
    CANCEL: {"job": (True, _STR), "req": (False, _OPT_STR), "client": (False, _TOKEN)},
    STATUS: {"job": (False, _OPT_STR), "req": (False, _OPT_STR), "client": (False, _TOKEN)},
    FETCH: {"job": (True, _STR), "watch": (False, _BOOL), "req": (False, _OPT_STR), "client": (False, _TOKEN)},
    PING: {"req": (False, _OPT_STR), "client": (False, _TOKEN)},
    CAPABILITIES: {"req": (False, _OPT_STR), "client": (False, _TOKEN)},
    ACCEPTED: {"job": (True, _STR), "kind": (True, _STR)},
    PROGRESS: {"job": (True, _STR), "stage": (True, _OPT_STR), "fraction": (True, _FRACTION), "message": (False, _ANY_STR)},
    RESULT: {"job": (True, _STR), "metadata": (False, _DICT)},
    ERROR: {"code": (True, _STR), "message": (True, _ANY_STR), "job": (False, _OPT_STR)},
    CANCELLED: {"job": (True, _STR)},
    PONG: {},
}


def decode(frames: Sequence[bytes], *, expect: Iterable[str] | None = None) -> Message:
    """Frames -> :class:`Message`, validating everything a peer may get wrong.

    ``expect`` limits the accepted message types (a server passes
    ``REQUEST_TYPES``). Raises :class:`ProtocolError` with the code a reply
    should carry.
    """
    if not frames:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "empty message")
    if len(frames[0]) > MAX_HEADER_BYTES:  # checked before anything is copied or parsed
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header frame is {len(frames[0])} bytes; the limit is {MAX_HEADER_BYTES}")
    raw = bytes(frames[0])
    try:
        header = json.loads(raw.decode("utf-8"), parse_float=_finite_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"frame 0 must be a UTF-8 JSON object: {str(exc)[:200]}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"frame 0 is nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "frame 0 must be a JSON object")
    if not _depth_ok(header, MAX_DEPTH):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"frame 0 is nested more than {MAX_DEPTH} levels deep")
    version = header.get("v")
    if not _is_int(version):
        raise ProtocolError(ErrorCode.BAD_VERSION, f"header needs an integer 'v' (protocol version, this peer speaks {PROTOCOL_VERSION})")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {quote(version, 32)} is not supported; supported: {list(SUPPORTED_VERSIONS)}")
    mtype = header.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "header needs a string 'type'")
    allowed = tuple(expect) if expect is not None else REQUEST_TYPES + REPLY_TYPES
    if mtype not in allowed:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {quote(mtype)}; expected one of {sorted(set(allowed))}")
    for name, (required, (check, what)) in _SCHEMAS.get(mtype, {}).items():
        if name not in header:
            if required:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"'{mtype}' needs field '{name}' ({what})")
            continue
        if not check(header[name]):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field '{name}' of '{mtype}' must be {what}")

    described = header.get("attachments", [])
    if not isinstance(described, list):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'attachments' must be a list")
    if len(described) > MAX_ATTACHMENTS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(described)} attachments; the limit is {MAX_ATTACHMENTS}")
    data_frames = list(frames[1:])
    if len(described) != len(data_frames):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"header describes {len(described)} attachment(s) but {len(data_frames)} frame(s) follow it",
        )
    attachments: list[Attachment] = []
    seen: set[str] = set()
    for i, (desc, data) in enumerate(zip(described, data_frames)):
        if not isinstance(desc, dict):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"attachments[{i}] must be an object")
        name, mime, size = desc.get("name"), desc.get("mime", "application/octet-stream"), desc.get("size")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"attachments[{i}] needs a 'name' (string, 1-128 chars)")
        if name in seen:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"attachment name {quote(name)} appears twice")
        seen.add(name)
        if not isinstance(mime, str):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"attachments[{i}].mime must be a string")
        data = bytes(data)
        if size is not None and (not _is_int(size) or size != len(data)):
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"attachment {quote(name)} declares size {quote(size, 32)} but its frame has {len(data)} bytes"
            )
        attachments.append(Attachment(name=name, mime=mime, data=data))
    return Message(header=header, attachments=attachments)


# --------------------------------------------------------------------------
# Constructors: every producer of a message goes through these.


def _with_req(header: dict, req: str | None, client: str | None = None) -> dict:
    if req is not None:
        header["req"] = req
    if client is not None:
        header["client"] = client
    return header


def submit(kind: str, params: Mapping[str, Any] | None = None, attachments: Sequence[Attachment] = (), req: str | None = None,
           client: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": SUBMIT, "kind": kind, "params": dict(params or {})}, req, client), attachments)


def cancel(job: str, req: str | None = None, client: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": CANCEL, "job": job}, req, client))


def status(job: str | None = None, req: str | None = None, client: str | None = None) -> list[bytes]:
    hdr: dict = {"type": STATUS}
    if job is not None:
        hdr["job"] = job
    return encode(_with_req(hdr, req, client))


def fetch(job: str, watch: bool = False, req: str | None = None, client: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": FETCH, "job": job, "watch": watch}, req, client))


def ping(req: str | None = None, client: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": PING}, req, client))


def capabilities_request(req: str | None = None, client: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": CAPABILITIES}, req, client))


def accepted(job: str, kind: str, position: int, req: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": ACCEPTED, "job": job, "kind": kind, "position": position}, req))


def _clamp01(x: float) -> float:
    return float(min(1.0, max(0.0, x))) if math.isfinite(x) else 0.0


def progress(
    job: str,
    stage: str,
    fraction: float,
    message: str = "",
    preview_png: bytes | None = None,
    stage_fraction: float | None = None,
) -> list[bytes]:
    """``fraction`` is the whole job's progress; ``stage_fraction`` the stage's own."""
    hdr = {"type": PROGRESS, "job": job, "stage": stage, "fraction": _clamp01(fraction), "message": message}
    if stage_fraction is not None:
        hdr["stage_fraction"] = _clamp01(stage_fraction)
    atts = [Attachment("preview", "image/png", preview_png)] if preview_png else []
    return encode(hdr, atts)


def result(job: str, metadata: Mapping[str, Any], attachments: Sequence[Attachment], req: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": RESULT, "job": job, "metadata": dict(metadata)}, req), attachments)


def error(code: str, message: str, job: str | None = None, req: str | None = None) -> list[bytes]:
    """An error reply; it always encodes (the message is cut to MAX_ERROR_MESSAGE characters, and
    ``job``/``req`` are dropped if they are not what a reply may carry)."""
    message = str(message)
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 1] + "…"
    if not (isinstance(req, str) and len(req) <= 256):
        req = None
    if not (isinstance(job, str) and len(job) <= 256):
        job = None
    hdr = {"type": ERROR, "code": str(code)[:64], "message": message}
    if job is not None:
        hdr["job"] = job
    return encode(_with_req(hdr, req))


def cancelled(job: str, req: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": CANCELLED, "job": job}, req))


def pong(server_time: float, req: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": PONG, "server_time": server_time}, req))


def status_reply(info: Mapping[str, Any], req: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": STATUS, **info}, req))


def capabilities_reply(info: Mapping[str, Any], req: str | None = None) -> list[bytes]:
    return encode(_with_req({"type": CAPABILITIES, **info}, req))
