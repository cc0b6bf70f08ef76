"""The local backend's installer: a virtual environment in the extension's user
folder with torch and the backend in it, made by subprocesses that never block
Blender.

:func:`plan` lists the steps (each one command line); :class:`Installer` runs
them one after the other, each in its own process group, all output into one
log file, and is polled from the add-on's timer (:meth:`Installer.poll` never
waits). It can be cancelled (the running step's process group is killed) and
run again over an existing environment to repair or upgrade it: ``venv`` and
``pip install --upgrade`` are both idempotent.

The backend comes from the wheel that ``build_addon.py`` puts into the
extension zip (``backend_wheel/``), or, for an add-on run from the source
tree, from the tree itself. torch comes first and on its own, so that the
build for the machine wins: the CUDA build where an NVIDIA driver is present,
the CPU build otherwise (or whatever the package index serves, for mirrors
and offline wheel folders). No bpy here.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

TORCH_SPEC = "torch==2.13.0"  # the backend's pin (pyproject.toml); a CUDA build of it satisfies it
TORCH_INDEX = {
    "cuda": "https://download.pytorch.org/whl/cu126",
    "cpu": "https://download.pytorch.org/whl/cpu",
}
TORCH_BUILDS = ("auto", "cuda", "cpu", "index")
IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"


def env_python(env_dir: str) -> str:
    """The Python of the environment at ``env_dir``."""
    if sys.platform == "win32":
        return os.path.join(env_dir, "Scripts", "python.exe")
    return os.path.join(env_dir, "bin", "python")


def installed_python(env_dir: str) -> str | None:
    """The environment's Python when the installer finished there (its marker file is written last)."""
    py = env_python(env_dir)
    return py if os.path.isfile(py) and os.path.isfile(os.path.join(env_dir, "gen3d-installed.txt")) else None


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver on this machine (``nvidia-smi`` answers with at least one GPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_torch_build(choice: str, detect=has_nvidia_gpu) -> str:
    """``auto`` becomes ``cuda`` or ``cpu`` for this machine; the others stay."""
    if choice not in TORCH_BUILDS:
        raise ValueError(f"torch build must be one of {', '.join(TORCH_BUILDS)}, not {choice!r}")
    if choice == "auto":
        return "cuda" if detect() else "cpu"
    return choice


def backend_source(addon_dir: str) -> str | None:
    """What to install the backend from: the zip's wheel, else the source tree the add-on lives in."""
    wheels = sorted(glob.glob(os.path.join(addon_dir, "backend_wheel", "*.whl")))
    if wheels:
        return wheels[-1]
    tree = os.path.dirname(os.path.realpath(addon_dir))
    if os.path.isfile(os.path.join(tree, "pyproject.toml")) and os.path.isdir(os.path.join(tree, "backend")):
        return tree
    return None


@dataclass
class Step:
    name: str  # short id: environment, torch, backend, check
    title: str  # for the panel
    argv: list[str]


def plan(python: str, env_dir: str, source: str, torch_build: str, torch_spec: str = TORCH_SPEC,
         pip_args: tuple[str, ...] | list[str] = ()) -> list[Step]:
    """The installer's steps. ``torch_build`` is resolved already (cuda, cpu or index); ``pip_args``
    go to every pip call (``--index-url``, ``--find-links``, a proxy...)."""
    py = env_python(env_dir)
    pip = [py, "-m", "pip", "install", "--upgrade", "--progress-bar", "off", *pip_args]
    torch_args = [] if torch_build == "index" else ["--index-url", TORCH_INDEX[torch_build]]
    check = ("import torch, backend, gen3d_wire; "
             "print('gen3d backend ready: torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu', "
             "'backend at', backend.__file__)")
    marker = os.path.join(env_dir, "gen3d-installed.txt")
    write_marker = f"open({marker!r}, 'w').write({torch_build!r} + '\\n')"
    return [
        Step("environment", "Creating the environment", [python, "-m", "venv", env_dir]),
        Step("torch", f"Installing torch ({torch_build})", pip + [torch_spec, *torch_args]),
        Step("backend", "Installing the backend", pip + [source]),
        Step("check", "Checking the backend", [py, "-c", check + "; " + write_marker]),
    ]


_PKG = re.compile(r"^\s*(?:Collecting|Downloading|Processing|Using cached|Building wheel for)\s+(\S+)")


@dataclass
class Installer:
    steps: list[Step]
    log_path: str
    state: str = IDLE
    index: int = 0  # the step running (or the one that failed)
    package: str = ""  # what pip works on now (from its output)
    message: str = ""
    started_at: float = 0.0
    proc: subprocess.Popen | None = None
    _log: object = None
    _read_pos: int = 0
    _packages_seen: int = 0
    lines: list = field(default_factory=list)

    # ---------------------------------------------------------------- running
    def start(self) -> None:
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self._log.write(f"gen3d backend installer, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._log.flush()
        self.state, self.index, self.started_at = RUNNING, 0, time.monotonic()
        self._launch()

    def _launch(self) -> None:
        step = self.steps[self.index]
        self.package, self._packages_seen = "", 0
        self.message = step.title
        self._log.write(f"\n== step {self.index + 1}/{len(self.steps)}: {step.title}\n$ {' '.join(step.argv)}\n")
        self._log.flush()
        env = dict(os.environ)
        for var in ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE"):  # Blender's Python settings are not the env's
            env.pop(var, None)
        env["PYTHONUNBUFFERED"] = "1"
        kwargs = {"start_new_session": True} if sys.platform != "win32" else {
            "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
        # in the log's folder, not Blender's working folder: a "backend" folder there must not stand in for
        # the installed package
        cwd = os.path.dirname(os.path.abspath(self.log_path))
        try:
            self.proc = subprocess.Popen(step.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=env, cwd=cwd, **kwargs)
        except OSError as exc:
            self._log.write(f"could not run {step.argv[0]!r}: {exc}\n")
            self._fail(f"Step '{step.name}' could not start: {exc}")

    def poll(self) -> str:
        """One non-blocking look at the running step; starts the next one when it ended well."""
        if self.state != RUNNING or self.proc is None:
            return self.state
        self._scan_log()
        rc = self.proc.poll()
        if rc is None:
            return self.state
        self.proc = None
        step = self.steps[self.index]
        if rc != 0:
            self._fail(f"Step '{step.name}' ({step.title.lower()}) failed with exit code {rc}")
            return self.state
        self.index += 1
        if self.index >= len(self.steps):
            self.state, self.message, self.package = DONE, "The local backend is installed", ""
            self._log.write("\n== done\n")
            self._close()
            return self.state
        self._launch()
        return self.state

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> str:
        """Poll until it ends (scripts and tests)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() == RUNNING:
            if end is not None and time.monotonic() > end:
                break
            time.sleep(interval)
        return self.state

    def cancel(self) -> bool:
        if self.state != RUNNING:
            return False
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                if sys.platform == "win32":
                    proc.kill()
                else:
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    if sys.platform != "win32":
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                    proc.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        self.proc = None
        self.state = CANCELLED
        self.message = f"Cancelled during step '{self.steps[self.index].name}'; run Install again to finish it"
        if self._log is not None:
            self._log.write("\n== cancelled\n")
        self._close()
        return True

    # ---------------------------------------------------------------- state
    @property
    def step(self) -> Step:
        return self.steps[min(self.index, len(self.steps) - 1)]

    @property
    def fraction(self) -> float:
        """Steps done, plus a little for each package pip has moved on to in this one."""
        if self.state == DONE:
            return 1.0
        within = 1.0 - 0.85 ** self._packages_seen
        return (self.index + 0.9 * within) / len(self.steps)

    def log_tail(self, n: int = 8) -> list[str]:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip()][-n:]

    # ------------------------------------------------------------- internals
    def _scan_log(self) -> None:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                fh.seek(self._read_pos)
                chunk = fh.read()
                self._read_pos = fh.tell()
        except OSError:
            return
        for line in chunk.splitlines():
            m = _PKG.match(line)
            if m:
                # "torch==2.13.0", "torch-2.13.0-cp311-...whl", "/path/gen3d-0.1.0-py3-none-any.whl": the name
                name = re.split(r"[=<>!~\[ ;]|-(?=\d)", os.path.basename(m.group(1)), maxsplit=1)[0]
                if name and name != self.package:
                    self.package = name
                    self._packages_seen += 1

    def _fail(self, message: str) -> None:
        self.state, self.message, self.proc = FAILED, message, None
        if self._log is not None:
            self._log.write(f"\n== failed: {message}\n")
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            try:
                self._log.close()
            except OSError:
                pass
            self._log = None
