"""The SAM family under DDP: one 2-process gloo launch (tests/sam_family_ddp_script.py) trains GSAM, WSAM (decoupled
and coupled), FriendlySAM and LookSAM in local and global mode and BSAM for 3 steps; each run is compared with a
plain-PyTorch reference computed in that script from the shards each rank trained on, and its all-reduces per step
are counted (DDP's gradient buckets, and the variants' own explicit all-reduce)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import run_two_process_script

pytestmark = pytest.mark.slow

FAMILY = ("gsam", "wsam-decoupled", "wsam-coupled", "friendlysam", "looksam")
RUNS = [*[(name, mode) for name in FAMILY for mode in ("local", "global")], ("bsam", "global")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("family_ddp")
    run_two_process_script(str(Path(__file__).resolve().parent / "sam_family_ddp_script.py"), out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("name, mode", RUNS, ids=lambda v: str(v))
def test_equals_plain_reference_and_same_weights_on_both_processes(ranks, name, mode):
    r0, r1 = ranks
    mine = r0[(name, mode)]
    for key, value in mine["weights"].items():
        assert torch.equal(value, r1[(name, mode)]["weights"][key]), key
    assert _max_diff(mine["weights"], mine["reference"]) < 1e-6


@pytest.mark.parametrize("name", FAMILY)
def test_local_and_global_references_differ(ranks, name):
    """The comparison above can tell the two modes apart: their references are far apart at this tolerance."""
    r0 = ranks[0]
    assert _max_diff(r0[(name, "local")]["reference"], r0[(name, "global")]["reference"]) > 1e-4


def test_all_reduces_per_step(ranks):
    """Per step, (DDP's gradient all-reduces, explicit all-reduces). Local mode: every pass runs under no_sync and
    the combined gradient and the step's state are averaged in ONE flat all-reduce; LookSAM's one-pass step (the
    second of k=2) is an ordinary DDP step. Global mode: SAM's two synchronized backward passes."""
    r0, r1 = ranks
    expected = {
        **{(name, "local"): [(0, 1)] * 3 for name in FAMILY if name != "looksam"},
        **{(name, "global"): [(2, 0)] * 3 for name in FAMILY if name != "looksam"},
        ("looksam", "local"): [(0, 1), (1, 0), (0, 1)],
        ("looksam", "global"): [(2, 0), (1, 0), (2, 0)],
        ("bsam", "global"): [(2, 0)] * 3,
    }
    for run, counts in expected.items():
        assert r0[run]["all_reduces"] == counts, run
        assert r1[run]["all_reduces"] == counts, run
