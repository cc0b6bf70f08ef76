"""Job kinds: parameter and attachment specs, validation, and the registry.

A job kind is a :class:`JobSpec`: a name, typed parameters with defaults and
bounds, the attachments it takes, and a handler ``(JobInputs, JobContext) ->
JobOutput`` that composes pipeline stages. The server validates a submit
against the spec before accepting it; the CLI builds its flags from the same
specs, so the two never disagree.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from gen3d_wire import protocol as P
from gen3d_wire.protocol import Attachment, ErrorCode, ProtocolError

from ..common.errors import InputError, JobError, ModelMissing  # noqa: F401 - part of the job layer's vocabulary
from ..common.progress import NULL, Progress


_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", dict: "object"}


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    nullable: bool = False
    check: Callable[[Any], Any] | None = None  # extra validation/normalisation; raise ValueError
    cli: bool = True  # exposed as a CLI flag

    def validate(self, value: Any) -> Any:
        where = f"parameter '{self.name}'"
        if value is None:
            if self.nullable:
                return None
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"{where} may not be null")
        t = self.type
        ok = (
            (t is bool and isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (t in (str, list, dict) and isinstance(value, t))
        )
        if not ok:
            raise ProtocolError(
                ErrorCode.BAD_PARAMS, f"{where} must be a {_TYPE_NAMES.get(t, t.__name__)}, got {type(value).__name__}"
            )
        if t is float:
            try:
                value = float(value)
            except OverflowError:  # an integer beyond a float's range
                value = math.inf
            if not math.isfinite(value):
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"{where} must be a finite number")
        if t is str and len(value) > 4000:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"{where} is longer than 4000 characters")
        if self.min is not None and value < self.min:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"{where} must be >= {self.min}, got {P.quote(value, 32)}")
        if self.max is not None and value > self.max:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"{where} must be <= {self.max}, got {P.quote(value, 32)}")
        if self.choices is not None and value not in self.choices:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"{where} must be one of {list(self.choices)}, got {P.quote(value)}")
        if self.check is not None:
            try:
                value = self.check(value)
            except (ValueError, TypeError) as exc:
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"{where}: {exc}") from None
        return value

    def describe(self) -> dict:
        d: dict[str, Any] = {"type": _TYPE_NAMES.get(self.type, self.type.__name__), "default": self.default, "help": self.help}
        if self.min is not None:
            d["min"] = self.min
        if self.max is not None:
            d["max"] = self.max
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.nullable:
            d["nullable"] = True
        return d


@dataclass(frozen=True)
class AttachmentSpec:
    name: str  # the attachment's name, or with ``multiple`` a prefix ("views/")
    kind: str  # "image" | "glb" | "json"
    required: bool = False
    help: str = ""
    multiple: bool = False  # any number of attachments whose names start with ``name``
    # a structural check of the bytes beyond their kind's (e.g. a GLB's accessors); raise ValueError
    check: Callable[[bytes], None] | None = None

    def matches(self, name: str) -> bool:
        return name.startswith(self.name) if self.multiple else name == self.name

    def describe(self) -> dict:
        mime = {"image": "image/png", "glb": "model/gltf-binary", "json": "application/json"}[self.kind]
        d = {"kind": self.kind, "mime": mime, "required": self.required, "help": self.help}
        if self.multiple:
            d["multiple"] = True
        return d


MAX_JSON_BYTES = 4 << 20  # a JSON attachment (cameras, transforms.json)
DEFAULT_MAX_JOB_PIXELS = 1 << 26  # 67 Mpx: 64 views of 1024x1024, or 4 images of 4096x4096


@dataclass
class Limits:
    max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES
    max_image_pixels: int = P.DEFAULT_MAX_IMAGE_PIXELS  # one image
    max_job_pixels: int = DEFAULT_MAX_JOB_PIXELS  # all images of one job together (what decoding them costs)


def check_image_bytes(data: bytes, max_pixels: int, name: str = "image") -> tuple[int, int]:
    """Cheap header-only check of an image attachment: format and pixel count.
    Returns (width, height). Raises ProtocolError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only: the declared size
            w, h = im.size
            fmt = im.format
    except UnidentifiedImageError:
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{name}' is not a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{name}' is not a readable image ({type(exc).__name__})") from None
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{name}' is {fmt}; send PNG (or JPEG/WebP)")
    if w * h > max_pixels:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"attachment '{name}' is {w}x{h} = {w * h} pixels; the limit is {max_pixels}"
        )
    if w < 8 or h < 8:
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{name}' is {w}x{h}; at least 8x8 is needed")
    return w, h


def check_glb_bytes(data: bytes, name: str = "mesh") -> None:
    import struct

    if len(data) < 20 or data[:4] != b"glTF":
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{name}' is not a GLB (binary glTF) file")
    version, length = struct.unpack_from("<II", data, 4)
    if version != 2:
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{name}' is glTF version {version}; only 2 is supported")
    if length != len(data):
        raise ProtocolError(
            ErrorCode.BAD_PARAMS, f"attachment '{name}' says it is {length} bytes long but {len(data)} arrived (truncated?)"
        )


@dataclass
class JobInputs:
    params: dict[str, Any]
    attachments: dict[str, bytes] = field(default_factory=dict)


@dataclass
class JobOutput:
    attachments: list[Attachment] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobContext:
    progress: Progress = NULL
    device: str = "cpu"
    models: Any = None  # a backend.models.ModelStore (or None where a kind needs none)
    workdir: Path | None = None
    limits: Limits = field(default_factory=Limits)


Handler = Callable[[JobInputs, JobContext], JobOutput]


@dataclass
class JobSpec:
    kind: str
    description: str
    handler: Handler
    params: tuple[Param, ...] = ()
    attachments: tuple[AttachmentSpec, ...] = ()
    # cross-field validation after the per-field checks; raise ValueError
    check: Callable[[JobInputs], None] | None = None

    def validate(self, params: Mapping[str, Any] | None, attachments: Iterable[Attachment], limits: Limits) -> JobInputs:
        params = dict(params or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            named = ", ".join(P.quote(u, 40) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise ProtocolError(
                ErrorCode.BAD_PARAMS, f"unknown parameter(s) {named} for '{self.kind}'; known: {sorted(known)}"
            )
        out = {name: p.validate(params[name]) if name in params else p.default for name, p in known.items()}
        data: dict[str, bytes] = {}
        found: dict[str, int] = {}
        pixels = 0
        for att in attachments:
            spec = next((sp for sp in self.attachments if sp.matches(att.name)), None)
            if spec is None:
                known = [sp.name + ("*" if sp.multiple else "") for sp in self.attachments]
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"unknown attachment {P.quote(att.name)} for '{self.kind}'; known: {known}")
            if len(att.data) == 0:
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{att.name}' is empty")
            if spec.kind == "image":
                w, h = check_image_bytes(att.data, limits.max_image_pixels, att.name)
                pixels += w * h
                if pixels > limits.max_job_pixels:
                    raise ProtocolError(
                        ErrorCode.TOO_LARGE, f"the images of this job add up to more than {limits.max_job_pixels} pixels "
                        f"(the limit per job; '{att.name}' is {w}x{h}); send fewer or smaller images")
            elif spec.kind == "glb":
                check_glb_bytes(att.data, att.name)
            elif spec.kind == "json":
                if len(att.data) > MAX_JSON_BYTES:  # parsing costs ~30x its size in memory
                    raise ProtocolError(ErrorCode.TOO_LARGE, f"attachment '{att.name}' is {len(att.data)} bytes of JSON; "
                                        f"the limit is {MAX_JSON_BYTES}")
                try:
                    json.loads(att.data.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{att.name}' is not UTF-8 JSON: {str(exc)[:200]}") from None
                except RecursionError:
                    raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{att.name}' is nested too deeply") from None
            if spec.check is not None:
                try:
                    spec.check(att.data)
                except ValueError as exc:
                    raise ProtocolError(ErrorCode.BAD_PARAMS, f"attachment '{att.name}': {str(exc)[:500]}") from None
            data[att.name] = att.data
            found[spec.name] = found.get(spec.name, 0) + 1
        for spec in self.attachments:
            if spec.required and not found.get(spec.name):
                what = f"attachments named '{spec.name}...'" if spec.multiple else f"attachment '{spec.name}'"
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"'{self.kind}' needs {what} ({spec.help})")
        inputs = JobInputs(out, data)
        if self.check is not None:
            try:
                self.check(inputs)
            except ValueError as exc:
                raise ProtocolError(ErrorCode.BAD_PARAMS, str(exc)) from None
        return inputs

    def describe(self) -> dict:
        return {
            "description": self.description,
            "params": {p.name: p.describe() for p in self.params},
            "attachments": {a.name: a.describe() for a in self.attachments},
        }


class Registry:
    """The job kinds a server or the CLI offers."""

    def __init__(self, specs: Iterable[JobSpec] = ()):
        self._specs: dict[str, JobSpec] = {}
        for s in specs:
            self.add(s)

    def add(self, spec: JobSpec) -> None:
        if spec.kind in self._specs:
            raise ValueError(f"job kind {spec.kind!r} registered twice")
        self._specs[spec.kind] = spec

    def get(self, kind: str) -> JobSpec | None:
        return self._specs.get(kind)

    def __contains__(self, kind: str) -> bool:
        return kind in self._specs

    def kinds(self) -> list[str]:
        return list(self._specs)

    def describe(self) -> dict:
        return {k: s.describe() for k, s in self._specs.items()}
