"""SAM in the geodesic geometry: adaptive SAM where there is no attention, a symmetry-respecting step where there is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness import SAM, GeodesicGeometry
from tests import reference
from tests.helpers import Classifier, assert_same_weights, classification_data, clone, loader, mlp, trainer


def test_geodesic_sam_without_attention_fails_before_training():
    module = Classifier(mlp())
    with pytest.raises(ValueError, match="found no attention heads"):
        trainer(max_steps=4, callbacks=[SAM(rho=0.5, geometry="geodesic")]).fit(module, loader(*classification_data()))
    assert module.calls == []


def test_geodesic_sam_without_attention_is_asam_when_heads_are_optional():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    geometry = GeodesicGeometry(require_heads=False)
    trainer(max_steps=4, callbacks=[SAM(rho=0.5, geometry=geometry)]).fit(Classifier(net), loader(x, y))
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(4):
        reference.sam_step(ref_net, opt, x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16], rho=0.5, eta=0.01)
    assert_same_weights(net, ref_net)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


class Sequences(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.calls.append({"loss": loss.item()})
        return loss


def test_geodesic_sam_on_a_transformer_restores_weights_and_trains():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    module = Sequences(TinyTransformer())
    geometry = GeodesicGeometry()
    before = clone(module.net)
    trainer(max_steps=4, callbacks=[SAM(rho=0.05, geometry=geometry)]).fit(module, loader(x, y))
    after = module.net
    assert all(torch.isfinite(p).all() for p in after.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    # each perturbed pass saw a higher loss than the pass at w it came from (ascent in the geodesic metric)
    losses = [c["loss"] for c in module.calls]
    assert all(perturbed > clean for clean, perturbed in zip(losses[0::2], losses[1::2]))
