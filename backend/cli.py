"""Command line: ``python -m backend VERB ...``.

Service verbs (serve, ping, capabilities, status, fetch, cancel, keys) and job
verbs (diagnose, reconstruct, generate, refine). A job verb runs in this
process by default, or on a running server with ``--endpoint``; both paths
validate parameters with the same job specs and print the same progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gen3d_wire import protocol as P
from gen3d_wire.client import DEFAULT_ENDPOINT, BackendError, Client, CurveKeys, JobCancelled, new_req, new_token

from .common.errors import InputError
from .service.jobs import DEFAULT_MAX_JOB_PIXELS, JobSpec

EXIT_OK, EXIT_FAIL, EXIT_UNREACHABLE, EXIT_CANCELLED, EXIT_USAGE = 0, 1, 3, 4, 2


# ---------------------------------------------------------------------------
# progress display


class ProgressPrinter:
    """One tqdm bar per stage on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, fraction: float, stage_fraction: float, message: str, preview: bytes | None = None) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=100, desc=f"{stage:>12}", unit="%", file=sys.stderr, leave=True,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}", mininterval=0.25)
        bar = self._bar
        target = int(round(stage_fraction * 100))
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(message[:60], refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------
# flags from job specs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_param_flags(parser: argparse.ArgumentParser, spec: JobSpec, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(f"{spec.kind} parameters")
    for p in spec.params:
        if not p.cli or p.name in skip:
            continue
        kw: dict[str, Any] = {"dest": "param_" + p.name, "default": None, "help": f"{p.help} (default {p.default!r})"}
        if p.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif p.type in (int, float, str):
            kw["type"] = p.type
            if p.choices:
                kw["choices"] = p.choices
        else:
            continue
        group.add_argument(_flag(p.name), **kw)


def params_from_args(args: argparse.Namespace, spec: JobSpec) -> dict:
    out = {}
    for p in spec.params:
        v = getattr(args, "param_" + p.name, None)
        if v is not None:
            out[p.name] = v
    return out


def add_client_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    g = parser.add_argument_group("connection")
    if required:
        g.add_argument("--endpoint", default=os.environ.get("GEN3D_ENDPOINT", DEFAULT_ENDPOINT),
                       help="backend address (default %(default)s; env GEN3D_ENDPOINT)")
    else:
        g.add_argument("--endpoint", default=None,
                       help="run on the backend at this address (e.g. tcp://127.0.0.1:5555) instead of in this process")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default %(default)s)")
    g.add_argument("--server-key", default=os.environ.get("GEN3D_SERVER_KEY"),
                   help="the server's public CurveZMQ key (server.key file or 40-char Z85); env GEN3D_SERVER_KEY")
    g.add_argument("--client-key", default=None, help="this client's key pair (client.key_secret) if the server restricts clients")
    g.add_argument("--client-token", default=None,
                   help="who this client is to the server: jobs are visible only to the token that submitted them "
                        "(default: env GEN3D_CLIENT_TOKEN, else a token kept in ~/.cache/gen3d/client.token)")


def add_model_flags(g) -> None:
    g.add_argument("--preset", default=os.environ.get("GEN3D_PRESET", "tiny"),
                   help="model preset: tiny, default, stable-zero123 (default %(default)s; env GEN3D_PRESET)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--text-to-image-model", default=None, help="hub id or folder overriding the preset's (env GEN3D_TEXT_TO_IMAGE_MODEL)")
    g.add_argument("--novel-view-model", default=None, help="hub id or folder overriding the preset's (env GEN3D_NOVEL_VIEW_MODEL)")
    g.add_argument("--novel-view-kind", default=None, choices=("zero123", "stable_zero123"),
                   help="camera vector of the novel-view model (env GEN3D_NOVEL_VIEW_KIND)")
    g.add_argument("--low-vram", action="store_true",
                   help="for small GPUs: attention and VAE slicing, idle models offloaded to the CPU")


def models_from_args(args, device: str):
    from .app import make_models

    return make_models(args.preset, device, args.low_vram, args.text_to_image_model, args.novel_view_model,
                       args.novel_view_kind)


def add_local_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("in-process run")
    add_model_flags(g)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def make_client(args: argparse.Namespace) -> Client:
    curve = None
    if args.server_key:
        from .service.keys import load_public

        pub = sec = None
        if args.client_key:
            import zmq.auth

            pub_b, sec_b = zmq.auth.load_certificate(args.client_key)
            pub, sec = pub_b.decode(), (sec_b or b"").decode() or None
        curve = CurveKeys(load_public(args.server_key), pub, sec)
    return Client(args.endpoint, timeout=args.timeout, curve=curve, token=client_token(args.client_token))


def client_token(given: str | None = None) -> str:
    """The CLI's client token: given, or GEN3D_CLIENT_TOKEN, or one kept (created on first use,
    readable by the user only) in GEN3D_HOME/client.token, so a job submitted from one shell can be
    fetched from another."""
    token = given or os.environ.get("GEN3D_CLIENT_TOKEN", "").strip()
    if token:
        return token
    base = os.environ.get("GEN3D_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "gen3d")
    path = Path(base) / "client.token"
    try:
        token = path.read_text().strip()
        if P.TOKEN_RE.match(token):
            return token
    except OSError:
        pass
    token = new_token()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except OSError:
        pass  # a read-only home: this process's token only
    return token


# ---------------------------------------------------------------------------
# running jobs


def run_job(args: argparse.Namespace, kind: str, params: dict, attachments: list[P.Attachment]) -> tuple[dict, dict[str, bytes]]:
    """Run a job in-process or on ``args.endpoint``; returns (metadata, files)."""
    printer = ProgressPrinter(getattr(args, "quiet", False))
    try:
        if args.endpoint:
            return _run_remote(args, kind, params, attachments, printer)
        return _run_local(args, kind, params, attachments, printer)
    finally:
        printer.close()


def _run_local(args, kind, params, attachments, printer) -> tuple[dict, dict[str, bytes]]:
    from .common import device as dev
    from .service.jobs import JobContext, Limits
    from .common.progress import Progress
    from .app import build_registry

    registry = build_registry()
    spec = registry.get(kind)
    assert spec is not None, kind
    limits = Limits()
    inputs = spec.validate(params, attachments, limits)
    device = dev.pick_device(args.device)
    models = models_from_args(args, device)
    ctx = JobContext(Progress(printer), device, models, None, limits)
    t0 = time.perf_counter()
    out = spec.handler(inputs, ctx)
    meta = dict(out.metadata)
    meta.setdefault("seconds", time.perf_counter() - t0)
    return meta, {a.name: a.data for a in out.attachments}


def _run_remote(args, kind, params, attachments, printer) -> tuple[dict, dict[str, bytes]]:
    client = make_client(args)
    job_holder: list[str] = []

    def on_progress(msg: P.Message) -> None:
        prev = msg.attachment("preview")
        printer(msg.get("stage"), msg.get("fraction"), msg.get("stage_fraction", msg.get("fraction")), msg.get("message", ""), prev.data if prev else None)

    try:
        msg = client.run(kind, params, attachments, on_progress=on_progress, on_accepted=job_holder.append,
                         idle_timeout=max(args.timeout, 30.0))
    except KeyboardInterrupt:
        if job_holder:
            print(f"\ncancelling job {job_holder[0]} ...", file=sys.stderr)
            client.cancel(job_holder[0])
            for m in client.events(job_holder[0], idle_timeout=args.timeout):
                if m.type in P.TERMINAL_TYPES:
                    break
        raise
    finally:
        client.close()
    return msg.get("metadata", {}), {a.name: a.data for a in msg.attachments}


def write_outputs(files: dict[str, bytes], mapping: dict[str, str | None]) -> list[Path]:
    """Write result attachments to the paths the user named (name -> path)."""
    written = []
    for name, path in mapping.items():
        if path is None:
            continue
        if name not in files:
            raise BackendError(P.ErrorCode.INTERNAL, f"the job returned no {name!r} (it returned {sorted(files)})")
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[name])
        written.append(p)
    return written


MODEL_FORMATS = ("glb", "obj", "ply")


def add_format_flag(p, formats=MODEL_FORMATS) -> None:
    p.add_argument("--format", choices=formats, default=None,
                   help="glb (the default, or what --out's suffix says) | obj (OBJ + MTL + PNG textures beside it, "
                   "Y up like the GLB) | ply (the Gaussians as a standard 3DGS .ply, in the GLB's frame)"
                   if "ply" in formats else "glb (the default, or what --out's suffix says) | obj (OBJ + MTL + PNG "
                   "textures beside it, Y up like the GLB)")


def faces_summary(meta: dict) -> str:
    """"1000 faces", or for quads "1002 polygons (390 quads) of 1392 triangles"."""
    if "polygons" in meta:
        return f"{meta['polygons']} polygons ({meta.get('quads')} quads) of {meta.get('faces')} triangles"
    return f"{meta.get('faces')} faces"


def check_topology(params: dict, fmt: str) -> None:
    """--topology quad (the job's triangles pair into about the budget's polygons; it says which to join) needs OBJ."""
    if params.get("topology") == "quad" and fmt != "obj":
        raise InputError("--topology quad needs --format obj (or --out NAME.obj): glTF stores triangles only "
                         "(in Blender, the add-on's Topology setting joins them)")


def output_format(args, formats=MODEL_FORMATS) -> str:
    """--format, else --out's suffix where it names one of ``formats``, else glb."""
    if getattr(args, "format", None):
        return args.format
    suffix = Path(args.out).suffix.lower().lstrip(".")
    return suffix if suffix in formats else "glb"


def write_model(files: dict[str, bytes], out: str, fmt: str) -> list[Path]:
    """The job's model in the chosen format: the GLB as it came, an OBJ set converted from it
    (``out`` with the suffix .obj, its MTL and textures in the same folder), or the Gaussians."""
    if fmt == "glb":
        return write_outputs(files, {"model.glb": out})
    if fmt == "ply":
        return write_outputs(files, {"gaussians.ply": out})
    if fmt != "obj":
        raise InputError(f"unknown format {fmt!r}")
    from .mesh.export import glb_to_obj

    if "model.glb" not in files:
        raise BackendError(P.ErrorCode.INTERNAL, f"the job returned no 'model.glb' (it returned {sorted(files)})")
    path = Path(out)
    path = path.with_suffix(".obj") if path.suffix else path.with_name(path.name + ".obj")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    pairs = None
    if "quads.json" in files:  # the job's pairs of triangles to join (topology quad)
        pairs = [json.loads(files["quads.json"].decode("utf-8"))["pairs"]]
    for name, data in glb_to_obj(files["model.glb"], path.stem, pairs=pairs).items():
        q = path.with_name(name) if name.endswith((".obj", ".mtl")) else path.parent / name
        q.write_bytes(data)
        written.append(q)
    return written


# ---------------------------------------------------------------------------
# verbs


def watch_parent(pid: int, stop: threading.Event, interval: float = 1.0) -> threading.Thread:
    """Set ``stop`` once process ``pid`` has ended (a crashed Blender leaves no orphan backend).

    The process is identified by pid and start time, so a recycled pid does not keep the server alive.
    """
    import psutil

    try:
        born = psutil.Process(pid).create_time()
    except psutil.Error:
        raise ValueError(f"--parent-pid {pid}: no such process") from None

    def alive() -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.create_time() == born and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def loop() -> None:
        while not stop.wait(interval):
            if not alive():
                logging.getLogger("gen3d").warning("parent process %d has ended; shutting down", pid)
                stop.set()

    t = threading.Thread(target=loop, name="gen3d-parent-watch", daemon=True)
    t.start()
    return t


def cmd_serve(args) -> int:
    from .service.jobs import Limits
    from .service.server import ConfigError, Server, ServerConfig, default_jobs_dir
    from .app import build_registry
    from .common import device as dev

    config = ServerConfig(
        host=args.host,
        port=args.port,
        preset=args.preset,
        device=args.device,
        jobs_dir=Path(args.jobs_dir) if args.jobs_dir else default_jobs_dir(),
        max_queue=args.max_queue,
        limits=Limits(max_message_bytes=int(args.max_message_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
                      max_job_pixels=args.max_job_pixels),
        keys_dir=Path(args.keys) if args.keys else None,
        authorized_clients=Path(args.authorized_clients) if args.authorized_clients else None,
        shared_jobs=args.shared_jobs,
    )
    try:
        from .service.server import check_bind_security

        check_bind_security(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    device = dev.pick_device(args.device)
    try:
        models = models_from_args(args, device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    server = Server(config, build_registry(), models,
                    announce=lambda ep: print(f"gen3d backend listening on {ep}", flush=True))

    def _stop(signum, frame):  # noqa: ARG001
        server._stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.parent_pid:
        try:
            watch_parent(args.parent_pid, server._stop)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        server.serve_forever()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # zmq.ZMQError is an OSError: port in use and the like
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_ping(args) -> int:
    try:
        with make_client(args) as c:
            rtt = c.ping()
    except BackendError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"pong from {args.endpoint} in {rtt * 1000:.2f} ms")
    return EXIT_OK


def cmd_capabilities(args) -> int:
    try:
        with make_client(args) as c:
            caps = c.capabilities()
    except BackendError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(caps, indent=2))
    return EXIT_OK


def cmd_status(args) -> int:
    try:
        with make_client(args) as c:
            info = c.status(args.job)
    except BackendError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code == "unreachable" else EXIT_FAIL
    print(json.dumps(info, indent=2))
    return EXIT_OK


def cmd_fetch(args) -> int:
    try:
        with make_client(args) as c:
            msg = c.fetch(args.job)
    except JobCancelled:
        print(f"job {args.job} was cancelled; it has no result", file=sys.stderr)
        return EXIT_CANCELLED
    except BackendError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code == "unreachable" else EXIT_FAIL
    out = Path(args.out)
    atts = msg.attachments
    if len(atts) == 1 and out.suffix:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(atts[0].data)
        print(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for a in atts:
            (out / a.name).write_bytes(a.data)
            print(out / a.name)
        (out / "metadata.json").write_text(json.dumps(msg.get("metadata", {}), indent=2))
    return EXIT_OK


def cmd_cancel(args) -> int:
    try:
        with make_client(args) as c:
            req = new_req()
            msg = c.request(P.cancel(args.job, req, c.token), req)
    except BackendError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code == "unreachable" else EXIT_FAIL
    print(f"job {args.job}: {msg.get('state')}{' (cancel requested)' if msg.get('cancel_requested') else ''}")
    return EXIT_OK


def cmd_keys(args) -> int:
    from .service.keys import generate

    try:
        paths = generate(args.dir)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"server secret key: {paths['server_secret']}  (keep it on the server)")
    print(f"server public key: {paths['server']}  (give it to clients: --server-key / the add-on's preferences)")
    print(f"client key pair:   {paths['client_secret']}")
    print(f"start the server:  python -m backend serve --host 0.0.0.0 --keys {args.dir}")
    return EXIT_OK


def cmd_prefetch(args) -> int:
    from .common.errors import ModelMissing
    from .models.presets import resolve
    from .models.store import prefetch, quiet_loading

    quiet_loading()
    preset = resolve(args.preset, args.text_to_image_model, args.novel_view_model, args.novel_view_kind)
    try:
        paths = prefetch(preset, progress=lambda m: print(m, flush=True))
    except ModelMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"preset {preset.name}: {len(paths)} model(s) ready")
    return EXIT_OK


def cmd_diagnose(args) -> int:
    from .kinds import diagnose

    params = params_from_args(args, diagnose.SPEC)
    meta, files = run_job(args, "diagnose", params, [])
    text = json.dumps({k: v for k, v in meta.items() if k != "seconds"}, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return EXIT_OK


def cmd_models(args) -> int:
    """The preset's models on the backend's disk (the add-on's model manager does the same over the wire)."""
    from .common.errors import ModelMissing
    from .models.files import human_size

    try:
        meta, _ = run_job(args, "models", {"action": args.action}, [])
    except ModelMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    for m in meta["models"]:
        where = f"{human_size(m['bytes'])} at {m['path']}" if m["present"] else "missing"
        print(f"{m['role']:14s} {m['name']}: {where}")
    print(f"preset {meta['preset']}: {'all present' if meta['present'] else 'incomplete'}, "
          f"{human_size(meta['bytes'])} on disk")
    return EXIT_OK


# Job verbs: name -> (help, configure(parser), run(args) -> int)
_JOB_VERBS: dict[str, tuple[str, Callable, Callable]] = {}


def job_verb(name: str, help: str):
    def deco(fn_pair):
        configure, run = fn_pair
        _JOB_VERBS[name] = (help, configure, run)
        return fn_pair

    return deco


# ---------------------------------------------------------------------------
# job verbs (one per job family), built on the kinds' specs

def _configure_reconstruct(p) -> None:
    from .kinds.reconstruct import SPEC

    p.add_argument("transforms", help="NeRF-synthetic transforms.json (views next to it)")
    p.add_argument("--out", required=True, help="output file (GLB; OBJ or PLY by --format or its suffix)")
    add_format_flag(p)
    p.add_argument("--ply", default=None, help="also write the Gaussians as a standard 3DGS .ply")
    p.add_argument("--background", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="background colour (0-1) of views without alpha")
    add_param_flags(p, SPEC)


def _run_reconstruct(args) -> int:
    from .kinds.reconstruct import SPEC, pack_transforms

    params = params_from_args(args, SPEC)
    fmt = output_format(args)
    check_topology(params, fmt)
    params["ply"] = bool(args.ply) or fmt == "ply"
    if args.background is not None:
        params["background"] = list(args.background)
    meta, files = run_job(args, "reconstruct", params, pack_transforms(args.transforms))
    for p in write_model(files, args.out, fmt) + write_outputs(files, {"gaussians.ply": args.ply}):
        print(p)
    t = meta.get("timings", {})
    print(f"{faces_summary(meta)}, {meta.get('gaussians')} gaussians, texture {meta.get('texture_size')} px; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return 0


job_verb("reconstruct", "posed views (transforms.json) -> textured mesh GLB")((_configure_reconstruct, _run_reconstruct))


def _configure_fronts(p) -> None:
    from .kinds.generate import FRONTS_SPEC

    p.add_argument("--prompt", required=True, help="what to make")
    p.add_argument("--out-dir", required=True, help="folder for front_<seed>.png")
    add_param_flags(p, FRONTS_SPEC, skip=("prompt",))


def _run_fronts(args) -> int:
    from .kinds.generate import FRONTS_SPEC

    params = dict(params_from_args(args, FRONTS_SPEC), prompt=args.prompt)
    meta, files = run_job(args, "text_to_image", params, [])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(meta["seeds"]):
        path = out / f"front_{seed}.png"
        path.write_bytes(files[f"front_{i}.png"])
        print(path)
    print(f"lift one: python -m backend generate --prompt {json.dumps(args.prompt)} --front FILE --seed SEED --out OUT.glb")
    return 0


job_verb("fronts", "prompt -> several front views (seed variations) to choose the one to lift")(
    (_configure_fronts, _run_fronts))


def _configure_generate(p) -> None:
    from .kinds.generate import TEXT_SPEC

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (text_to_3d)")
    src.add_argument("--image", help="reference image file (image_to_3d)")
    p.add_argument("--front", default=None, help="with --prompt: lift this front view (one that `fronts` made) "
                                                  "instead of making one (with --method sds: anchor on it); give "
                                                  "its seed with --seed")
    p.add_argument("--out", required=True, help="output file (GLB; OBJ or PLY by --format or its suffix)")
    add_format_flag(p)
    p.add_argument("--reference-out", default=None, help="also write the framed reference image (PNG)")
    add_param_flags(p, TEXT_SPEC, skip=("prompt",))


def _run_generate(args) -> int:
    from .kinds.generate import TEXT_SPEC

    if args.prompt is not None:
        kind, params, atts = "text_to_3d", params_from_args(args, TEXT_SPEC), []
        params["prompt"] = args.prompt
        if args.front:
            front = Path(args.front)
            if not front.is_file():
                raise InputError(f"{front} not found")
            atts = [P.Attachment("image", "image/png", front.read_bytes())]
    elif args.front:
        raise InputError("--front goes with --prompt (for an image alone, use --image)")
    else:
        path = Path(args.image)
        if not path.is_file():
            raise InputError(f"{path} not found")
        kind = "image_to_3d"
        params = {k: v for k, v in params_from_args(args, TEXT_SPEC).items() if k not in ("steps", "guidance")}
        atts = [P.Attachment("image", "image/png", path.read_bytes())]
    fmt = output_format(args)
    check_topology(params, fmt)
    params["ply"] = fmt == "ply"
    meta, files = run_job(args, kind, params, atts)
    for p in write_model(files, args.out, fmt) + write_outputs(files, {"reference.png": args.reference_out}):
        print(p)
    t = meta.get("timings", {})
    print(f"{faces_summary(meta)}, {meta.get('views')} {'rig renders' if meta.get('method') == 'sds' else 'novel views'}; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if "." not in k))
    return 0


job_verb("generate", "a prompt (--prompt) or a reference image (--image) -> textured mesh GLB")((_configure_generate, _run_generate))


def _configure_refine(p) -> None:
    from .kinds.refine import SPEC

    p.add_argument("mesh", help="GLB to refine")
    p.add_argument("--out", required=True, help="output file (GLB; OBJ by --format or its suffix)")
    add_format_flag(p, ("glb", "obj"))
    p.add_argument("--reference", default=None, help="reference image (PNG/JPEG)")
    p.add_argument("--cameras", default=None, help="scene cameras (JSON, see docs/jobs.md) or a transforms.json")
    add_param_flags(p, SPEC)


def _run_refine(args) -> int:
    from .kinds.refine import SPEC

    atts = []
    for flag, name, mime in ((args.mesh, "mesh", "model/gltf-binary"), (args.reference, "image", "image/png"),
                             (args.cameras, "cameras", "application/json")):
        if flag is None:
            continue
        path = Path(flag)
        if not path.is_file():
            raise InputError(f"{path} not found")
        atts.append(P.Attachment(name, mime, path.read_bytes()))
    fmt = output_format(args, ("glb", "obj"))
    meta, files = run_job(args, "refine_texture", params_from_args(args, SPEC), atts)
    for p in write_model(files, args.out, fmt):
        print(p)
    print(f"{meta.get('faces')} faces, UVs from {meta.get('uv_source')}, {meta.get('steps')} steps in "
          f"{meta.get('timings', {}).get('refine', 0):.1f}s")
    if "reference_registration" in meta:
        print(f"reference registered by silhouette: IoU {meta['reference_registration']['iou']:.3f}")
    for w in meta.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    return 0


job_verb("refine", "refine or restyle the texture of a mesh (GLB) from a prompt and/or reference image")((_configure_refine, _run_refine))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="python -m backend", description="gen3d backend: text/image to textured 3D mesh")
    parser.add_argument("--version", action="version", version=f"gen3d backend {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("serve", help="run the ZeroMQ backend service")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s; others need --keys)")
    p.add_argument("--port", type=int, default=5555, help="TCP port (default %(default)s; 0 picks a free one)")
    add_model_flags(p)
    p.add_argument("--jobs-dir", default=None, help="where job results are kept (default ~/.cache/gen3d/jobs; env GEN3D_HOME)")
    p.add_argument("--max-queue", type=int, default=64, help="jobs that may wait (default %(default)s)")
    p.add_argument("--max-message-mb", type=float, default=256.0, help="largest accepted message in MiB (default %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=P.DEFAULT_MAX_IMAGE_PIXELS, help="largest accepted image, in pixels")
    p.add_argument("--max-job-pixels", type=int, default=DEFAULT_MAX_JOB_PIXELS,
                   help="all images of one job together, in pixels (default %(default)s)")
    p.add_argument("--shared-jobs", action="store_true",
                   help="every client may see, fetch and cancel every job (default: only the client that submitted it)")
    p.add_argument("--keys", default=None, help="CurveZMQ key folder (python -m backend keys generate DIR); needed off loopback")
    p.add_argument("--authorized-clients", default=None, help="folder of client public keys allowed to connect")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="shut down when this process ends (the add-on passes Blender's pid when it starts a backend)")
    p.set_defaults(func=cmd_serve)

    for name, fn, hlp in (("ping", cmd_ping, "check that a backend answers; prints the round-trip time"),
                          ("capabilities", cmd_capabilities, "print the backend's job kinds, presets, device and versions")):
        p = sub.add_parser(name, help=hlp)
        add_client_flags(p, required=True)
        p.set_defaults(func=fn)

    p = sub.add_parser("status", help="server status, or one job's")
    p.add_argument("job", nargs="?", default=None)
    add_client_flags(p, required=True)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("fetch", help="download a finished job's result")
    p.add_argument("job")
    p.add_argument("--out", required=True, help="file (single result) or folder")
    add_client_flags(p, required=True)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job")
    add_client_flags(p, required=True)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("prefetch", help="download (or build) the models a preset needs")
    add_model_flags(p)
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser("keys", help="CurveZMQ keys for a backend reachable from other machines")
    ks = p.add_subparsers(dest="keys_verb", required=True)
    kg = ks.add_parser("generate", help="make server and client key pairs in DIR")
    kg.add_argument("dir")
    kg.set_defaults(func=cmd_keys)

    from .kinds import diagnose

    p = sub.add_parser("diagnose", help="device, memory and library versions (in-process or on --endpoint)")
    add_param_flags(p, diagnose.SPEC)
    p.add_argument("--out", default=None, help="also write the report to this JSON file")
    add_client_flags(p)
    add_local_flags(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("models", help="the preset's models on disk: status, download (or build), remove")
    p.add_argument("action", nargs="?", default="status", choices=("status", "download", "remove"))
    add_client_flags(p)
    add_local_flags(p)
    p.set_defaults(func=cmd_models)

    for name, (hlp, configure, run) in _JOB_VERBS.items():
        p = sub.add_parser(name, help=hlp)
        configure(p)
        add_client_flags(p)
        add_local_flags(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose if args.verb != "serve" else logging.INFO - 10 * args.verbose,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except JobCancelled as exc:
        print(f"cancelled: {exc.message}", file=sys.stderr)
        return EXIT_CANCELLED
    except BackendError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code == "unreachable" else EXIT_FAIL
    except P.ProtocolError as exc:
        print(f"error: [{exc.code}] {exc.message}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - shown as one line; -v shows the traceback
        if args.verbose:
            raise
        from .common.errors import JobError

        if not isinstance(exc, (JobError, FileNotFoundError, ValueError)):
            logging.getLogger("gen3d").debug("unexpected failure", exc_info=True)
            print(f"error: {type(exc).__name__}: {exc} (run with -v for details)", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
