"""Torchmetrics metrics: per-ability scorers and the continual-learning accuracy matrix."""

from hft_lightning.metrics.accuracy_matrix import AccuracyMatrix

__all__ = ["AccuracyMatrix"]
