"""Callbacks of a run besides the curriculum and the retention methods."""

from hft_lightning.callbacks.report import Report

__all__ = ["Report"]
