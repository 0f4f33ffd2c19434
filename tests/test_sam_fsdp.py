"""SAM under FSDP: each process holds a shard of the gradient, so the norm SAM divides by must be the global one.

Lightning runs FSDP on CUDA only; this test needs two GPUs and is skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lightning_sharpness import SAM
from tests import reference
from tests.ddp_modules import DDPClassifier, DumpState, shard_indices
from tests.helpers import classification_data, clone, loader, mlp, trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP across shards needs 2 GPUs"),
]

STEPS, BATCH, WORLD = 3, 8, 2


def test_fsdp_sam_uses_the_global_gradient_norm(tmp_path):
    net = mlp()
    x, y = classification_data(n=STEPS * BATCH * WORLD)
    strategy = FSDPStrategy(start_method="spawn", use_orig_params=True)
    fit = trainer(accelerator="cuda", devices=WORLD, strategy=strategy, max_steps=STEPS)
    fit.callbacks.extend([SAM(rho=0.05), DumpState(str(tmp_path))])
    fit.fit(DDPClassifier(clone(net)), loader(x, y, batch_size=BATCH))

    # FSDP reduces gradients in every backward, so SAM sees the global gradient: n-SAM over the union batch.
    shards = shard_indices(len(y), WORLD)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        idx = torch.cat([s[t * BATCH : (t + 1) * BATCH] for s in shards])
        reference.sam_step(net, opt, x[idx], y[idx], rho=0.05)
    state = torch.load(tmp_path / "rank0.pt")["state"]
    for key, value in net.state_dict().items():
        # GPU kernels sum in another order than the CPU reference: agreement to 1e-5, not bitwise
        assert torch.allclose(state[f"net.{key}"], value, atol=1e-5, rtol=0), key
