"""Benchmark: our top eigenvalue and trace against PyHessian on CPU, same model (small CNN with BatchNorm) and batch.

Each method runs in a fresh subprocess; peak memory is the growth of its resident set (``ru_maxrss``) over the
state after loading the model and data. Accuracy is the relative error against a tight reference (Lanczos to
1e-10 for the eigenvalue; the exact trace from one HVP per parameter). Prints ratios measured in this one run.

    python benchmarks/measures.py            # needs `pip install pyhessian`
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 3, 16, 16, generator=g), torch.randint(0, 10, (128,), generator=g)
    model.train()
    with torch.no_grad():  # realistic running statistics
        for _ in range(5):
            model(torch.randn(128, 3, 16, 16, generator=g))
    return model.eval(), x, y


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _job(name, queue):
    torch.set_num_threads(1)
    import pyhessian  # noqa: F401  (imports are not part of the measurement)

    import lightning_sharpness.measures  # noqa: F401

    model, x, y = make()
    loss_fn(model, (x, y)).backward()
    model.zero_grad(set_to_none=True)
    base = _rss_mb()
    start = time.perf_counter()
    if name == "ours_eig":
        from lightning_sharpness.measures import hessian_eigenvalues

        r = hessian_eigenvalues(model, loss_fn, (x, y), k=1, tol=1e-4)
        value, cost = float(r), r.matvecs
    elif name == "ours_trace":
        from lightning_sharpness.measures import hessian_trace

        r = hessian_trace(model, loss_fn, (x, y), matvecs=99)
        value, cost = float(r), r.matvecs
    elif name == "pyhessian_eig":
        from pyhessian import hessian

        h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        eig, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
        value, cost = float(eig[0]), None
    elif name == "pyhessian_trace":
        from pyhessian import hessian

        h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        tr = h.trace(maxIter=100, tol=1e-3)
        value, cost = float(sum(tr) / len(tr)), len(tr)
    elif name == "reference":
        from lightning_sharpness.curvature import HessianOperator, diagonal, lanczos_eigs

        op = HessianOperator(model, loss_fn, (x, y), chunk_size=64)
        lam = float(lanczos_eigs(op, 1, tol=1e-10, max_iter=300).eigenvalues[0])
        tr = float(diagonal(op, exact=True, block=64).value.sum())
        value, cost = (lam, tr), None
    elif name == "cost_ratio":
        from lightning_sharpness.curvature import HessianOperator

        op = HessianOperator(model, loss_fn, (x, y))
        v = torch.randn(op.dim)
        V = torch.randn(op.dim, 16)
        op @ v
        op @ V

        def best(f, reps=10):
            f()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            return min(times)

        t_grad = best(lambda: op.gradient())
        t_hvp = best(lambda: op @ v)
        t_block = best(lambda: op @ V, reps=3) / 16
        value, cost = (t_hvp / t_grad, t_block / t_grad, op.backend, op.dim), None
    queue.put((name, value, cost, time.perf_counter() - start, _rss_mb() - base))


def run(name):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_job, args=(name, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    res = {n: run(n) for n in ("reference", "ours_eig", "pyhessian_eig", "ours_trace", "pyhessian_trace", "cost_ratio")}
    lam, tr = res["reference"][1]
    rows = []
    for what, ours, theirs, truth in (("top eigenvalue", "ours_eig", "pyhessian_eig", lam),
                                      ("trace", "ours_trace", "pyhessian_trace", tr)):
        o, t = res[ours], res[theirs]
        rows.append((what, abs(o[1] - truth) / abs(truth), abs(t[1] - truth) / abs(truth), o[3], t[3], o[4], t[4]))
    print(f"CNN with BatchNorm, {res['cost_ratio'][1][3]} parameters, batch 128 of 3x16x16, CPU, 1 thread")
    print(f"{'measure':16s} {'rel.err ours':>12s} {'rel.err PyH':>12s} {'time ours':>10s} {'time PyH':>10s} "
          f"{'time ratio':>10s} {'mem ours MB':>11s} {'mem PyH MB':>10s}")
    for what, eo, et, to, tt, mo, mt in rows:
        print(f"{what:16s} {eo:12.2e} {et:12.2e} {to:9.2f}s {tt:9.2f}s {to / tt:10.2f} {mo:11.1f} {mt:10.1f}")
    r = res["cost_ratio"][1]
    print(f"HVP / gradient time: single {r[0]:.2f}, per vector in a block of 16: {r[1]:.2f} (backend {r[2]})")
    print(f"matvecs: ours eig {res['ours_eig'][2]}, ours trace {res['ours_trace'][2]}, "
          f"PyHessian trace iterations {res['pyhessian_trace'][2]}")


if __name__ == "__main__":
    main()
