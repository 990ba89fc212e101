"""Errors raised by :mod:`prinmix_jax.models`.

Every error names the file and, where there is one, the tensor or config key at fault. Missing files
raise the built-in :class:`FileNotFoundError` (with the path in the message); everything else raises one
of the :class:`ValueError` subclasses below, so ``except ValueError`` catches all bad-input cases.
"""


class CheckpointError(ValueError):
    """A checkpoint folder, its config.json or one of its safetensors files is unusable."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one this package implements."""


class CalibrationDataError(ValueError):
    """Calibration data cannot be read, tokenized or is too short."""
