"""Test-wide isolation."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _seed_stays_in_its_test(monkeypatch):
    """``seed_everything`` writes ``PL_GLOBAL_SEED`` (and ``PL_SEED_WORKERS``) into ``os.environ``; Lightning's
    DistributedSampler seeds its shuffle from it and spawned DDP workers inherit it. Without this, an example run
    in-process by one test changes which examples another test's DDP ranks see."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
