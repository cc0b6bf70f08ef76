"""Service figures on loopback: ping round trip, and moving a 20 MB GLB result.

    python bench/service.py [--pings 2000] [--fetches 20] [--mb 20]

Starts ``python -m backend serve`` in a subprocess (as a user would), places a
finished job with a real ~20 MB GLB in its jobs folder, and times ``fetch`` of
it from a client: the same path a client takes to collect any result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.service.server import owner_key  # noqa: E402
from gen3d_wire.client import Client, new_token  # noqa: E402


def make_glb(target_mb: float) -> bytes:
    import trimesh

    # a vertex is 12 bytes, a face 12 bytes: pick a grid of about target_mb
    n = int(np.sqrt(target_mb * 1e6 / 36))
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    verts = np.stack([u.ravel(), v.ravel(), np.sin(6 * u.ravel()) * 0.1], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return trimesh.Trimesh(verts, faces, process=False).export(file_type="glb")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--fetches", type=int, default=20)
    ap.add_argument("--mb", type=float, default=20.0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        jobs = Path(tmp) / "jobs"
        job = uuid.uuid4().hex
        token = new_token()  # jobs belong to a client: this one owns the placed job
        glb = make_glb(args.mb)
        (jobs / job / "result").mkdir(parents=True)
        (jobs / job / "result" / "model.glb").write_bytes(glb)
        (jobs / job / "job.json").write_text(json.dumps({
            "id": job, "kind": "bench", "params": {}, "state": "done", "metadata": {}, "owner": owner_key(token, b""),
            "results": [{"name": "model.glb", "mime": "model/gltf-binary", "size": len(glb)}],
        }))
        proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--port", "0", "--jobs-dir", str(jobs)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline()
            endpoint = line.strip().split("listening on ")[1]
            with Client(endpoint, timeout=30, token=token) as c:
                for _ in range(50):
                    c.ping()
                rtts = [c.ping() for _ in range(args.pings)]
                times = []
                for _ in range(args.fetches):
                    t0 = time.perf_counter()
                    msg = c.fetch(job)
                    times.append(time.perf_counter() - t0)
                    assert len(msg.attachment("model.glb").data) == len(glb)
        finally:
            proc.terminate()
            proc.wait(10)

    size_mb = len(glb) / 1e6
    med = statistics.median(times)
    print(f"ping round trip: median {statistics.median(rtts) * 1e6:.0f} us, p99 {np.percentile(rtts, 99) * 1e6:.0f} us over {len(rtts)} pings")
    print(f"fetch of a {size_mb:.1f} MB GLB: median {med * 1e3:.1f} ms ({size_mb / med:.0f} MB/s), "
          f"min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms over {len(times)} fetches")


if __name__ == "__main__":
    main()
