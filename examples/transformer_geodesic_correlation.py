"""Geodesic vs adaptive sharpness on transformers: which one ranks generalization?

*Hide & Seek: Transformer Symmetries Obscure Sharpness & Riemannian Geometry Finds It* (da Silva, Dangel, Oore,
ICML 2025; seed 000) argues that adaptive sharpness correlates weakly with generalization on transformers because
attention is invariant under GL(h) moves of its query/key and value/output weights, and that worst-case
sharpness in the geodesic ball of the quotient by that symmetry restores a strong rank correlation (Kendall tau
with the generalization gap) on ViTs (ImageNet) and BERT (MNLI). Those models are out of reach on 2 CPU cores;
this script trains a family of small transformers from scratch instead:

- architectures: ``nn.TransformerEncoder`` (learned positions, first-token readout) and HuggingFace
  ``BertForSequenceClassification`` built from a tiny ``BertConfig`` (no download);
- task: synthetic sequences of tokens; the label says whether the first token appears again later in the
  sequence (a query/key match, so attention has to do the work), balanced by construction;
- hyperparameters drawn per model: learning rate, width, weight decay, batch size, training label noise;

and measures each model at the end on training examples: worst-case sharpness in the adaptive and in the
geodesic geometry (``measures.worst_case_sharpness(geometry=...)``) and tr(H) (Hutch++). The table is Kendall's
tau of each measure with the generalization gap (train accuracy - test accuracy, train accuracy on the labels
the model was trained on), over all models and per architecture, with its spread over bootstrap resamples of
the models.

python examples/transformer_geodesic_correlation.py           # the full run (about 10 minutes on 2 CPU cores)
python examples/transformer_geodesic_correlation.py --quick   # seconds: tiny sizes, checks the pipeline only
tensorboard --logdir lightning_logs/transformer_geodesic_correlation
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import bootstrap_tau, report  # noqa: E402

from lightning_sharpness import measures  # noqa: E402

NAME = "transformer_geodesic_correlation"
ARCHITECTURES = ("encoder", "bert")
MEASURES = {"adaptive": "adaptive worst-case sharpness", "geodesic": "geodesic worst-case sharpness", "trace": "tr(H)"}


# ------------------------------------------------------------------------------------------------- data
def repeat_task(n: int, length: int, vocab: int, seed: int) -> TensorDataset:
    """``n`` sequences of ``length`` uniform tokens; label 1 when the first token occurs again later.

    With ``(1 - 1/vocab)^(length - 1)`` close to 1/2 the classes are balanced (vocab 16, length 12: 51% / 49%).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = (x[:, 1:] == x[:, :1]).any(dim=1).long()
    return TensorDataset(x, y)


def with_label_noise(data: TensorDataset, noise: float, seed: int) -> TensorDataset:
    """A copy of ``data`` whose labels are flipped with probability ``noise``."""
    x, y = data.tensors
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < noise
    return TensorDataset(x, torch.where(flip, 1 - y, y))


# ----------------------------------------------------------------------------------------------- models
class EncoderClassifier(nn.Module):
    """Token + learned position embeddings, ``nn.TransformerEncoder`` (pre-norm), a linear readout of the first
    position."""

    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x) + self.position[: x.shape[1]])
        return self.head(self.norm(h[:, 0]))


class BertClassifier(nn.Module):
    """HuggingFace ``BertForSequenceClassification`` from a tiny config (random init, nothing downloaded),
    returning its logits; the first token plays BERT's [CLS]."""

    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * width,
            max_position_embeddings=length,
            type_vocab_size=1,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=x).logits


def build(architecture: str, args: argparse.Namespace, width: int) -> nn.Module:
    cls = EncoderClassifier if architecture == "encoder" else BertClassifier
    return cls(args.vocab, args.length, width, args.heads, args.layers)


class SequenceClassifier(pl.LightningModule):
    """Cross-entropy training of a sequence classifier with AdamW and a cosine learning rate."""

    def __init__(self, net: nn.Module, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------------ family
@dataclass
class Config:
    architecture: str
    lr: float
    width: int
    weight_decay: float
    batch_size: int
    label_noise: float
    seed: int


def family(args: argparse.Namespace) -> list[Config]:
    """``args.models`` configurations, half of each architecture, hyperparameters drawn from the grids with a
    fixed seed (the same family every run)."""
    rng = random.Random(args.family_seed)
    return [
        Config(
            architecture=ARCHITECTURES[i % 2],
            lr=rng.choice(args.lrs),
            width=rng.choice(args.widths),
            weight_decay=rng.choice(args.weight_decays),
            batch_size=rng.choice(args.batch_sizes),
            label_noise=rng.choice(args.label_noises),
            seed=i,
        )
        for i in range(args.models)
    ]


@torch.no_grad()
def accuracy(net: nn.Module, data: TensorDataset) -> float:
    net.eval()
    x, y = data.tensors
    return float((net(x).argmax(1) == y).float().mean())


def train_and_measure(config: Config, train_clean: TensorDataset, test: TensorDataset, args) -> dict[str, float]:
    pl.seed_everything(config.seed, workers=True)
    train = with_label_noise(train_clean, config.label_noise, seed=1000 + config.seed)
    net = build(config.architecture, args, config.width)
    model = SequenceClassifier(net, config.lr, config.weight_decay)
    logger = TensorBoardLogger(args.log_dir, name=config.architecture, version=f"model{config.seed}")
    logger.log_hyperparams(asdict(config))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    g = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    trainer.fit(
        model,
        DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=g),
        DataLoader(test, batch_size=500),
    )
    seconds = time.perf_counter() - start

    train_acc, test_acc = accuracy(net, train), accuracy(net, test)
    # Sharpness of the loss the model was trained on (its noisy labels), on the first training examples.
    x, y = train.tensors
    probe = [(x[i : i + 128], y[i : i + 128]) for i in range(0, args.probe_examples, 128)]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    start = time.perf_counter()
    values = {
        geometry: float(
            measures.worst_case_sharpness(net, loss_fn, probe, rho=args.rho, geometry=geometry, steps=args.steps)
        )
        for geometry in ("adaptive", "geodesic")
    }
    values["trace"] = float(measures.hessian_trace(net, loss_fn, probe, matvecs=args.matvecs, method="hutch++"))
    measuring = time.perf_counter() - start
    row = {"train_acc": train_acc, "test_acc": test_acc, "gap": train_acc - test_acc, **values}
    logger.log_metrics({f"final/{k}": v for k, v in row.items()}, trainer.global_step)
    logger.experiment.flush()
    return {**row, "seconds": seconds, "measuring": measuring}


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=20, help="models in the family (half of each architecture)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--label-noises", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--rho", type=float, default=0.1, help="radius of the adaptive and geodesic l2 balls")
    parser.add_argument("--steps", type=int, default=10, help="ascent steps of the worst-case sharpness")
    parser.add_argument("--matvecs", type=int, default=30, help="Hessian-vector products of the trace")
    parser.add_argument("--probe-examples", type=int, default=128, help="training examples the measures use")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for tau's spread")
    parser.add_argument("--family-seed", type=int, default=0)
    parser.add_argument("--log-dir", default=f"lightning_logs/{NAME}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.epochs, args.widths, args.train_size, args.test_size = 4, 1, [8], 128, 128
        args.steps, args.matvecs, args.probe_examples, args.bootstrap = 2, 6, 64, 50
    if args.models < 4:
        parser.error(
            f"--models must be at least 4 (two of each architecture for a rank correlation), got {args.models}"
        )
    if args.probe_examples > args.train_size:
        parser.error(f"--probe-examples ({args.probe_examples}) must not exceed --train-size ({args.train_size})")
    if any(w % args.heads for w in args.widths):
        parser.error(f"every --widths value must be divisible by --heads {args.heads}, got {args.widths}")

    started = time.time()
    train_clean = repeat_task(args.train_size, args.length, args.vocab, seed=12345)
    test = repeat_task(args.test_size, args.length, args.vocab, seed=54321)
    results: list[tuple[Config, dict[str, float]]] = []
    for i, config in enumerate(family(args), 1):
        print(f"[{i}/{args.models}] {config} ...", end=" ", flush=True)
        r = train_and_measure(config, train_clean, test, args)
        print(
            f"gap {r['gap']:.3f} (train {r['train_acc']:.3f}, test {r['test_acc']:.3f}), adaptive {r['adaptive']:.4g}, "
            f"geodesic {r['geodesic']:.4g}, tr(H) {r['trace']:.4g}; {r['seconds']:.1f} s + {r['measuring']:.1f} s",
            flush=True,
        )
        results.append((config, r))

    groups = {"all": results, **{a: [(c, r) for c, r in results if c.architecture == a] for a in ARCHITECTURES}}
    header = ["measure", *(f"tau, {g} ({len(rs)} models)" for g, rs in groups.items())]
    rows = []
    for key, label in MEASURES.items():
        row: list[object] = [label]
        for rs in groups.values():
            tau, std = bootstrap_tau([r[key] for _, r in rs], [r["gap"] for _, r in rs], args.bootstrap)
            row.append(f"{tau:+.2f} ± {std:.2f}")
        rows.append(row)
    gaps = [r["gap"] for _, r in results]
    notes = [
        f"Kendall's tau-b of each measure with the generalization gap (train accuracy - test accuracy) over a family "
        f"of {args.models} transformers ({args.models // 2 + args.models % 2} `nn.TransformerEncoder`, "
        f"{args.models // 2} HuggingFace BERT; {args.layers} layers, {args.heads} heads), ± its std over "
        f"{args.bootstrap} bootstrap resamples of the models. Task: does the first of {args.length} tokens "
        f"(vocabulary {args.vocab}) occur again; {args.train_size} training and {args.test_size} test sequences. "
        f"Per model, drawn from: lr {args.lrs}, width {args.widths}, weight decay {args.weight_decays}, batch "
        f"{args.batch_sizes}, label noise {args.label_noises}; AdamW, cosine schedule, {args.epochs} epochs. Gaps "
        f"range {min(gaps):.3f} to {max(gaps):.3f}.",
        "",
        f"Measures at the final weights on the first {args.probe_examples} training examples (their training "
        f"labels): worst-case sharpness max L(w + d) - L(w) over the l2 ball of radius {args.rho} in the adaptive "
        f"geometry (|w| + 0.01) and in the geodesic geometry (attention heads by their GL(h)-invariant metric, "
        f"every other parameter adaptive), {args.steps} ascent steps, best of 10 starts; tr(H): Hutch++ with "
        f"{args.matvecs} products.",
    ]
    report(
        NAME,
        "Geodesic vs adaptive sharpness on small transformers: Kendall tau with the generalization gap",
        header,
        rows,
        started,
        notes,
        quick=args.quick,
    )
    print(f"TensorBoard logs in {args.log_dir}/: tensorboard --logdir {args.log_dir}")
    return rows


if __name__ == "__main__":
    main()
