"""CurveZMQ key pairs for a backend reachable beyond loopback."""

from __future__ import annotations

import os
from pathlib import Path


def generate(directory: str | os.PathLike) -> dict[str, Path]:
    """Create a server and a client key pair in ``directory``.

    ``server.key_secret`` stays with the server; ``server.key`` (public) goes
    to every client; ``client.key_secret`` is one client's identity, and its
    ``client.key`` can be put in the server's ``--authorized-clients`` folder.
    Existing keys are never overwritten.
    """
    import zmq.auth

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (d / f"{name}.key").exists() or (d / f"{name}.key_secret").exists():
            raise FileExistsError(f"{d / name}.key already exists; remove it or choose another folder")
    out = {}
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(str(d), name)
        os.chmod(secret, 0o600)
        out[name] = Path(public)
        out[name + "_secret"] = Path(secret)
    return out


def load_public(path: str | os.PathLike) -> str:
    """Z85 public key from a ``.key`` or ``.key_secret`` file, or a literal 40-char key."""
    import zmq.auth

    p = Path(path)
    if not p.exists() and len(str(path)) == 40:
        return str(path)
    public, _ = zmq.auth.load_certificate(str(p))
    return public.decode()
