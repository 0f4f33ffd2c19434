"""SAM under DDP with 2 CPU processes (gloo): local and global modes against single-process references, and
the number of gradient all-reduces per step counted with a DDP communication hook."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_sharpness import SAM, SAMEngine
from tests import reference
from tests.ddp_modules import (
    CountAllReduces,
    DDPClassifier,
    DumpState,
    ManualDDPClassifier,
    ReleaseProcessGroup,
    shard_indices,
)
from tests.helpers import classification_data, clone, loader, mlp, trainer

pytestmark = pytest.mark.slow

STEPS, BATCH, WORLD = 4, 8, 2


def run_ddp(module, tmp_path, callbacks=()):
    strategy = DDPStrategy(start_method="spawn")
    x, y = classification_data(n=STEPS * BATCH * WORLD)
    trainer(
        devices=WORLD,
        strategy=strategy,
        max_steps=STEPS,
        callbacks=[*callbacks, CountAllReduces(), DumpState(str(tmp_path)), ReleaseProcessGroup()],
    ).fit(module, loader(x, y, batch_size=BATCH))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for key, value in ranks[0]["state"].items():  # every process ends with the same weights
        assert torch.equal(value, ranks[1]["state"][key]), key
    return ranks[0]


def reference_run(net, local: bool):
    """Single process, each step on the union of the shards: rank r's shard is what Lightning's
    DistributedSampler gives it (training samplers always shuffle, seed 0)."""
    x, y = classification_data(n=STEPS * BATCH * WORLD)
    shards = shard_indices(len(y), WORLD)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        idx = torch.cat([s[t * BATCH : (t + 1) * BATCH] for s in shards])
        # local: the mean of per-shard SAM gradients = m-SAM with one chunk per shard; global: n-SAM on the union
        reference.sam_step(net, opt, x[idx], y[idx], rho=0.05, m=BATCH if local else None)
    return net


def assert_matches(state, net, atol=1e-6):
    for key, value in net.state_dict().items():
        mine = state[f"net.{key}"]
        assert torch.allclose(mine, value, atol=atol, rtol=0), f"{key}: {(mine - value).abs().max()}"


@pytest.fixture(scope="module")
def plain_communication(tmp_path_factory):
    plain = run_ddp(DDPClassifier(mlp()), tmp_path_factory.mktemp("plain"))
    assert plain["calls"] >= STEPS and plain["bytes"] > 0  # the hook saw plain DDP's all-reduces
    return plain


@pytest.mark.parametrize("mode", ["local", "global"])
def test_ddp_modes_match_single_process_references(mode, tmp_path, plain_communication):
    net = mlp()
    result = run_ddp(DDPClassifier(clone(net)), tmp_path, callbacks=[SAM(rho=0.05, mode=mode)])
    assert_matches(result["state"], reference_run(net, local=mode == "local"))
    if mode == "local":  # one gradient all-reduce per step, as plain DDP
        assert result["calls"] == plain_communication["calls"]
        assert result["bytes"] == plain_communication["bytes"]
    else:  # the perturbation itself needs the all-reduced gradient
        assert result["calls"] == 2 * plain_communication["calls"]


def test_ddp_m_sharpness_matches_reference(tmp_path, plain_communication):
    """m-SAM under DDP: each process's chunks are perturbed on their own (Lightning's whole-batch backward is
    skipped, its forward under no_sync); the union's chunks of 4 are exactly the processes' chunks."""
    net = mlp()
    result = run_ddp(DDPClassifier(clone(net)), tmp_path, callbacks=[SAM(rho=0.05, m=4)])
    x, y = classification_data(n=STEPS * BATCH * WORLD)
    shards = shard_indices(len(y), WORLD)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        idx = torch.cat([s[t * BATCH : (t + 1) * BATCH] for s in shards])
        reference.sam_step(net, opt, x[idx], y[idx], rho=0.05, m=4)
    assert_matches(result["state"], net)
    assert result["calls"] == plain_communication["calls"]  # one gradient all-reduce per step


def test_mixin_ddp_local_mode(tmp_path, plain_communication):
    net = mlp()
    result = run_ddp(ManualDDPClassifier(clone(net), SAMEngine(rho=0.05)), tmp_path)
    assert_matches(result["state"], reference_run(net, local=True))
    assert result["calls"] == plain_communication["calls"]
