"""Errors of model I/O, so callers can tell "could not get or load a model" from a bug."""

from __future__ import annotations


class ModelFetchError(RuntimeError):
    """A packaged model could not be downloaded, assembled, verified or converted.

    The message says what failed, where (the file or package), and what to do about it.
    """


class ModelLoadError(RuntimeError):
    """A model folder or id could not be loaded as asked (device, dtype, quantisation, tokenizer)."""
