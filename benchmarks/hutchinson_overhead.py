"""Overhead around the Hessian-vector products: Hutchinson's, Hutch++'s and XTrace's traces and Lanczos on a
~200k-parameter ReLU MLP.

Model: a 100-400-400-10 ReLU MLP (204,810 parameters), cross-entropy on one batch of 256 from a noisy teacher,
40 SGD steps, float32, CPU, one thread. The operator's gradient graph is built before timing, so every call times
the same products through the held graph.

For each call: the wall time, the time inside the products (the operator's per-batch product blocks, timed by
wrapping them) and the rest (probes, transposes, copies, reductions, Lanczos' basis and reorthogonalization),
and the peak of live tensor bytes the call added (``benchmarks/peak_memory.py``, the profiler's memory timeline),
next to the held graph's saved tensors and one block of ``chunk_size`` vectors. Medians over repeats.

    python benchmarks/hutchinson_overhead.py            # about a minute
    PYTHONPATH=/path/to/old/checkout python benchmarks/hutchinson_overhead.py   # the same on another version
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from measures import make_mlp  # the benchmark's 200k-parameter MLP, 40 SGD steps on a noisy teacher
from peak_memory import PeakMemory

from lightning_sharpness.curvature import HessianOperator, hutchinson, hutchpp, lanczos_eigs, xtrace

REPEATS = 5


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


class Timed:
    """Wraps the operator's per-batch product block to add up the seconds spent in it."""

    def __init__(self, op: HessianOperator) -> None:
        self.seconds = 0.0
        inner = op._hvp_block

        def block(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        op._hvp_block = block


def measure(name: str, op: HessianOperator, call) -> dict:
    timer = Timed(op)
    call()  # warm-up
    walls, inside = [], []
    for _ in range(REPEATS):
        timer.seconds = 0.0
        start = time.perf_counter()
        out = call()
        walls.append(time.perf_counter() - start)
        inside.append(timer.seconds)
    with PeakMemory() as mem:
        call()
    wall, prod = statistics.median(walls), statistics.median(inside)
    return {"name": name, "wall": wall, "products": prod, "outside": wall - prod, "peak": mem.peak, "out": out}


def main() -> None:
    torch.set_num_threads(1)
    model, x, y = make_mlp()
    op = HessianOperator(model, loss_fn, (x, y), backend="autograd")
    op.gradient()  # builds and holds the gradient graph
    block = op.chunk_size * op.dim * op.params[0].element_size()
    print(
        f"ReLU MLP 100-400-400-10, {op.dim} parameters, batch 256, float32, CPU, 1 thread; held graph "
        f"{op.graph_bytes / 2**20:.1f} MiB, one block of {op.chunk_size} vectors {block / 2**20:.1f} MiB"
    )
    rows = []
    for probes in (60, 99):
        rows.append(
            measure(f"hutchinson {probes}", op, lambda p=probes: hutchinson(op, p, torch.Generator().manual_seed(0)))
        )
    rows.append(measure("hutch++ 99", op, lambda: hutchpp(op, 99, torch.Generator().manual_seed(0))))
    for m in (48, 98):
        rows.append(measure(f"xtrace {m}", op, lambda m=m: xtrace(op, m, torch.Generator().manual_seed(0))))
    for tol in (1e-2, 1e-3):

        def eig(t=tol):
            res = lanczos_eigs(op, k=1, tol=t, generator=torch.Generator().manual_seed(0))
            return res.matvecs

        rows.append(measure(f"lanczos tol={tol:g}", op, eig))

    def fixed():  # 30 steps whatever the version's stopping rule: the basis and reorthogonalization costs alone
        return lanczos_eigs(op, k=1, tol=1e-12, max_iter=30, generator=torch.Generator().manual_seed(0)).matvecs

    rows.append(measure("lanczos 30 steps", op, fixed))
    print(f"{'call':20s} {'wall ms':>9s} {'products ms':>12s} {'outside ms':>11s} {'outside %':>10s} {'peak MiB':>9s}")
    for r in rows:
        extra = f"  ({r['out']} products)" if isinstance(r["out"], int) else ""
        print(
            f"{r['name']:20s} {1e3 * r['wall']:9.1f} {1e3 * r['products']:12.1f} {1e3 * r['outside']:11.1f} "
            f"{100 * r['outside'] / r['wall']:9.1f}% {r['peak'] / 2**20:9.1f}{extra}"
        )


if __name__ == "__main__":
    main()
