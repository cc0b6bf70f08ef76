"""gen3d backend: the process that owns the models and runs generation jobs."""

__version__ = "0.1.0"
