"""A backend started by the add-on: ``<python> -m backend serve --port P --preset X``.

No bpy here: a reader thread collects the process's output (for the panel,
when it fails to start); it never touches Blender data.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading


class BackendProcess:
    def __init__(self, python: str, port: int, preset: str, cwd: str | None = None, extra_args: list[str] | None = None):
        self.python = python
        self.port = int(port)
        self.preset = preset
        self.cwd = cwd or None
        # --parent-pid: the backend shuts itself down if Blender ends without stopping it (a crash)
        self.args = [python, "-m", "backend", "serve", "--port", str(self.port), "--preset", preset,
                     "--parent-pid", str(os.getpid()), *(extra_args or [])]
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not self.python:
            raise RuntimeError("no Python set for the backend (add-on preferences > Auto-start > Python)")
        if not (os.path.isfile(self.python) or os.path.sep not in self.python):
            raise RuntimeError(f"the backend's Python {self.python!r} does not exist")
        if self.cwd and not os.path.isdir(self.cwd):
            raise RuntimeError(f"the backend's working folder {self.cwd!r} does not exist")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        for var in ("PYTHONHOME", "PYTHONPATH"):  # Blender's own Python settings are not the backend's
            env.pop(var, None)
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         encoding="utf-8", errors="replace", **kwargs)
        except OSError as exc:
            raise RuntimeError(f"could not start {self.python!r}: {exc}") from None
        self.lines.append("$ " + " ".join(self.args))
        self._reader = threading.Thread(target=self._read, name="gen3d-backend-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        try:
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))
        except (OSError, ValueError):
            pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_tail(self, n: int = 8) -> list[str]:
        return list(self.lines)[-n:]

    def stop(self, timeout: float = 5.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        if self._reader is not None:
            self._reader.join(2.0)
        if proc.stdout is not None and (self._reader is None or not self._reader.is_alive()):
            try:
                proc.stdout.close()
            except OSError:
                pass
