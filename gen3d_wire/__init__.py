"""Wire format and client of the gen3d backend (pyzmq + standard library only)."""

from . import protocol  # noqa: F401

__all__ = ["protocol", "client"]
