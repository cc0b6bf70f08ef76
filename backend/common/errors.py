"""The errors a pipeline stage raises about its input or its models.

Each carries the error code a client is told (the strings of the wire's
``ErrorCode``; this module depends on nothing so that every layer may use it).
"""

from __future__ import annotations


class JobError(Exception):
    """An error a job reports to its client with a specific code."""

    code = "job_failed"


class InputError(JobError, ValueError):
    """The input is unusable (bad image, broken GLB, NaN cameras...)."""

    code = "bad_input"


class ModelMissing(JobError):
    """Weights are not on disk and cannot be downloaded."""

    code = "model_missing"
