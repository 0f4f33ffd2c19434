"""m-SAM step time and peak memory: the engine's per-chunk loop against the vectorized passes, on CPU.

The digits CNN (``examples/digits.py`` ``small_cnn``, width 32 as in ``DigitsClassifier``) on one batch of 64
real digits, SGD. For each m in {1, 4, 16, 64}, against a plain step (forward, backward, optimizer step):

  * ``loop``: the callback's m-SAM step today: the ordinary pass (Lightning's), then ``accumulate_sam_gradient``;
  * ``vectorized``: the same step with the loop replaced by ``vectorized_msam_gradient``;
  * ``loop alone`` / ``vectorized alone``: the m-SAM passes without the ordinary pass, i.e. exactly what the
    vectorization replaces, and the cost of the mixin's step (whose passes at w also update BatchNorm
    statistics, replayed by the vectorized path; timed here with the statistics frozen, as in the callback).

Also printed: the largest difference between the loop's and the vectorized gradients (they must agree to
1e-5), and the peak memory of one step above a plain step, in MiB (PyTorch's profiler records the
allocations; the CPU allocator keeps no statistics). Then the same in Lightning: ``Trainer.fit`` of a
LightningModule around the CNN, plain against the ``SAM(m=...)`` callback (its loop) and against
``SAM(m=..., vectorize=True)`` (the vectorized passes from 8 chunks on, the loop below).

    OMP_NUM_THREADS=1 python benchmarks/msam_vectorized.py [--steps 20] [--repeats 3] [--width 32] [--threads 1]
        [--ms 1 4 16 64] [--skip-lightning]

Timings are CPU time of this process (``time.process_time``: single-threaded, so other processes on a shared
machine do not inflate it), medians over steps taken round-robin over configurations. The vectorized path is
timed for every m (``min_chunks=1``), although by default fewer than 8 chunks are left to the loop.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peak_memory
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples
from peak_memory import PeakMemory  # noqa: E402

from examples.digits import small_cnn  # noqa: E402
from lightning_sharpness import SAM  # noqa: E402
from lightning_sharpness.geometry import StandardGeometry  # noqa: E402
from lightning_sharpness.sam.engine import SAMEngine, accumulate_sam_gradient  # noqa: E402
from lightning_sharpness.sam.vectorized import vectorized_msam_gradient  # noqa: E402

RHO = 0.05


def digits_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (torch.tensor(data.images[:batch_size], dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    return x, torch.tensor(data.target[:batch_size], dtype=torch.long)


def loss_of_chunk(module: nn.Module, chunk) -> torch.Tensor:
    x, y = chunk
    return F.cross_entropy(module(x), y)


class Setup:
    """A model, its optimizer (lr 0: every configuration times the same weights) and one step per configuration."""

    def __init__(self, width: int, batch) -> None:
        torch.manual_seed(0)
        self.model = small_cnn(width)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=0.9)
        self.batch = batch
        self.engines: dict[int, SAMEngine] = {}

    def engine(self, m: int) -> SAMEngine:
        if m not in self.engines:
            self.engines[m] = SAMEngine(rho=RHO, m=m)
        engine = self.engines[m]
        engine.follow(self.model, self.optimizer)
        return engine

    def plain(self) -> None:
        loss_of_chunk(self.model, self.batch).backward()
        self._step()

    def sam(self, m: int, vectorized: bool, ordinary_pass: bool) -> None:
        engine = self.engine(m)
        stash = engine.take_grads()
        if ordinary_pass:  # Lightning's pass: L(w) and the running statistics, the gradient of a single chunk
            loss_of_chunk(self.model, self.batch).backward()
        if vectorized:
            engine.take_grads()  # not the chunks' gradient
            stats = vectorized_msam_gradient(
                self.model, loss_of_chunk, self.batch, m, RHO, StandardGeometry(), engine._params,
                lambda loss: loss.backward(), min_chunks=1,
            )  # fmt: skip
            assert stats is not None, "the benchmark must time the vectorized path, not the fallback"
        else:
            accumulate_sam_gradient(
                engine, self.batch, lambda chunk: loss_of_chunk(self.model, chunk), lambda loss: loss.backward(),
                RHO, 1.0, stash, ordinary_pass,
            )  # fmt: skip
        self._step()

    def _step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gradient(self, m: int, vectorized: bool) -> list[torch.Tensor]:
        """The SAM gradient of the callback's step, computed on a copy (the optimizer is not stepped)."""
        model = copy.deepcopy(self.model)
        engine = SAMEngine(rho=RHO, m=m)
        engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.0))
        stash = engine.take_grads()
        loss_of_chunk(model, self.batch).backward()
        if vectorized:
            engine.take_grads()
            vectorized_msam_gradient(
                model,
                loss_of_chunk,
                self.batch,
                m,
                RHO,
                StandardGeometry(),
                engine._params,
                lambda v: v.backward(),
                min_chunks=1,
            )
        else:
            accumulate_sam_gradient(
                engine, self.batch, lambda c: loss_of_chunk(model, c), lambda v: v.backward(), RHO, 1.0, stash, True,
            )  # fmt: skip
        return [p.grad for p in model.parameters()]


def time_round_robin(configs: dict[str, Callable[[], None]], steps: int, repeats: int) -> dict[str, float]:
    for run in configs.values():  # warm-up: first calls trace, allocate and fill caches
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, run in configs.items():
            for _ in range(steps):
                start = time.process_time()
                run()
                times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_bytes(run: Callable[[], None]) -> int:
    run()  # not the first call: what a step holds, not what a first call allocates once
    with PeakMemory() as memory:
        run()
    return memory.peak


# ---------------------------------------------------------------- in Lightning: the step the issue measures
class Classifier(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = small_cnn(width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(Callback):
    """CPU time of each training step (batch start to batch end, optimizer step included) after a warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(time.process_time() - self._start)


class RepeatedBatch:
    """The same batch ``n`` times, as a data loader Lightning accepts (a plain list would be read as n loaders)."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


def lightning_step_times(width: int, batch, callbacks: list, steps: int, warmup: int = 3) -> list[float]:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps + warmup, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
    )  # fmt: skip
    trainer.fit(Classifier(width), RepeatedBatch(batch, steps + warmup))
    return timer.times


def lightning_table(args, batch) -> None:
    configs: dict[str, Callable[[], list]] = {"plain": lambda: []}
    for m in args.ms:
        configs[f"m={m} loop"] = partial(lambda m: [SAM(rho=RHO, m=m)], m)
        configs[f"m={m} vectorized"] = partial(lambda m: [SAM(rho=RHO, m=m, vectorize=True)], m)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, make in configs.items():
            times[name] += lightning_step_times(args.width, batch, make(), args.steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    plain = medians["plain"]
    print(f"\nIn Lightning (Trainer.fit, the SAM callback), plain step {plain * 1e3:.2f} ms CPU time")
    print("(vectorized: SAM(m=..., vectorize=True), which runs the loop below 8 chunks):")
    print("| m | loop / plain | vectorized / plain | speed-up |")
    print("|---|---|---|---|")
    for m in args.ms:
        loop, vec = medians[f"m={m} loop"], medians[f"m={m} vectorized"]
        print(f"| {m} | {loop / plain:.2f} | {vec / plain:.2f} | {loop / vec:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--width", type=int, default=32, help="channels of small_cnn's first block (32: DigitsClassifier's default)"
    )
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-lightning", action="store_true", help="only the plain-PyTorch table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = digits_batch(args.batch_size)
    setup = Setup(args.width, batch)
    param_bytes = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    print(
        f"small_cnn(width={args.width}): {param_bytes // 4} parameters ({param_bytes / 2**10:.0f} KiB); batch "
        f"{args.batch_size}; {args.threads} thread(s); torch {torch.__version__}"
    )
    configs: dict[str, Callable[[], None]] = {"plain": setup.plain}
    for m in args.ms:
        for vectorized in (False, True):
            for ordinary in (True, False):
                name = f"m={m} {'vectorized' if vectorized else 'loop'}{'' if ordinary else ' alone'}"
                configs[name] = partial(setup.sam, m, vectorized, ordinary)
    medians = time_round_robin(configs, args.steps, args.repeats)
    plain = medians["plain"]
    plain_peak = peak_bytes(setup.plain)
    print(f"\nPlain PyTorch, plain step {plain * 1e3:.2f} ms CPU time, peak {plain_peak / 2**20:.2f} MiB:")
    print(
        "| m | chunks | loop / plain | vectorized / plain | loop alone / plain | vectorized alone / plain "
        "| speed-up | extra peak MiB, loop / vectorized | max abs gradient difference |"
    )
    print("|" + "---|" * 9)
    for m in args.ms:
        loop, vec = medians[f"m={m} loop"], medians[f"m={m} vectorized"]
        loop_alone, vec_alone = medians[f"m={m} loop alone"], medians[f"m={m} vectorized alone"]
        extra = [(peak_bytes(partial(setup.sam, m, v, True)) - plain_peak) / 2**20 for v in (False, True)]
        difference = max(float((a - b).abs().max()) for a, b in zip(setup.gradient(m, False), setup.gradient(m, True)))
        print(
            f"| {m} | {-(-args.batch_size // m)} | {loop / plain:.2f} | {vec / plain:.2f} | {loop_alone / plain:.2f} "
            f"| {vec_alone / plain:.2f} | {loop / vec:.1f}x | {extra[0]:.2f} / {extra[1]:.2f} | {difference:.1e} |"
        )
    if not args.skip_lightning:
        lightning_table(args, batch)


if __name__ == "__main__":
    main()
