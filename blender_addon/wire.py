"""The shared wire code (``gen3d_wire``), wherever it lives.

In the built extension ``gen3d_wire`` is a subpackage of the add-on (copied in
by ``build_addon.py``) and pyzmq comes from the bundled wheels. When the add-on
runs from the source tree (tests, development) the top-level ``gen3d_wire``
package of the repository is used instead.

Importing this module never fails: when pyzmq or the wire code is missing,
``P`` and ``C`` are None and ``IMPORT_ERROR`` says why, so the add-on can
still register and show the problem in its panel.
"""

from __future__ import annotations

P = None  # gen3d_wire.protocol
C = None  # gen3d_wire.client
IMPORT_ERROR: str | None = None

try:
    try:
        from .gen3d_wire import client as C, protocol as P  # noqa: F811 (bundled copy)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.endswith("gen3d_wire"):
            raise  # the bundled copy is there but something it needs is not (pyzmq)
        from gen3d_wire import client as C, protocol as P  # noqa: F811 (source tree)
except ImportError as exc:  # pragma: no cover - depends on the installation
    P = C = None
    missing = getattr(exc, "name", None)
    if missing == "zmq":
        IMPORT_ERROR = ("pyzmq is not available in Blender's Python. Install the add-on from the "
                        "gen3d-<version>.zip made by build_addon.py: it bundles pyzmq.")
    else:
        IMPORT_ERROR = f"the gen3d wire code could not be loaded: {exc}"


def available() -> bool:
    return C is not None


def require():
    """(protocol, client) modules, or RuntimeError with a readable message."""
    if C is None:
        raise RuntimeError(IMPORT_ERROR or "the gen3d wire code is not available")
    return P, C
