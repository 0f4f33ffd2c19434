"""Deprecated location: the batch contract lives in :mod:`lightning_sharpness.batching`; these names stay
importable from here."""

from lightning_sharpness.batching import BATCH_FORMS, Batches, as_batches, batch_size, is_ambiguous, split_batch

__all__ = ["Batches", "BATCH_FORMS", "as_batches", "batch_size", "is_ambiguous", "split_batch"]
