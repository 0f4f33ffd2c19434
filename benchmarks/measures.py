"""Benchmark: our top eigenvalue and trace against PyHessian on CPU at matched accuracy, same model and batch.

Model: a small CNN with BatchNorm (eval mode, running statistics from a few training-mode passes), one batch of
128 images 3x16x16, cross-entropy, float32, one thread per process.

1. Ground truth: the dense Hessian from ``dim`` products (float32 products, float64 eigendecomposition): its
   top eigenvalue and its trace.
2. Accuracy: PyHessian at its defaults (``hessian(model, criterion, data=(x, y), cuda=False)``,
   ``.eigenvalues(top_n=1)`` with tol 1e-3 / maxIter 100, ``.trace()`` with tol 1e-3 / maxIter 100; the seed is
   ``torch.manual_seed(s)``) over several seeds. Then ours with the loosest settings that are at least as
   accurate over the same seeds: the eigenvalue's median and worst relative error no larger than PyHessian's
   (Lanczos ``tol`` from a ladder), the trace's root-mean-square relative error no larger than PyHessian's
   (the fewest products, Hutchinson or Hutch++).
3. Time and peak memory: every method in fresh processes, rounds interleaved (the machine is shared), one
   untimed warm-up call, then one timed call per seed; the median. Peak memory is the peak of live tensor bytes
   during one call, from the profiler's memory timeline (``benchmarks/peak_memory.py``).
4. Cost of one Hessian-vector product over one gradient (forward + backward), medians of interleaved repeats.

    python benchmarks/measures.py            # needs `pip install pyhessian`; about 3 minutes on 1-2 cores
"""

from __future__ import annotations

import math
import multiprocessing as mp
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from peak_memory import PeakMemory
from torch import nn

EIG_SEEDS = range(10)
TRACE_SEEDS = range(20)
TIME_SEEDS = range(5)
ROUNDS = 3
LANCZOS_TOLS = (0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 3e-3, 1e-3, 1e-4)
HUTCHINSON_MATVECS = (10, 14, 18, 22, 26, 30, 34, 38, 44, 50, 60, 70, 85, 100)
HUTCHPP_MATVECS = (12, 18, 24, 30, 36, 42, 48, 54, 60, 75, 90, 99, 120)


def make():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
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


# ---------------------------------------------------------------------------------------------- the methods
def pyhessian_eig(model, x, y, seed):
    from pyhessian import hessian

    torch.manual_seed(seed)
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    value = float(h.eigenvalues(top_n=1)[0][0])
    model.zero_grad(set_to_none=True)  # PyHessian's backward(create_graph=True) wrote .grad
    return value


def pyhessian_trace(model, x, y, seed):
    from pyhessian import hessian

    torch.manual_seed(seed)
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    tr = h.trace()
    model.zero_grad(set_to_none=True)
    return float(sum(tr) / len(tr))


def ours_eig(model, x, y, seed, tol):
    from lightning_sharpness.measures import hessian_eigenvalues

    return float(hessian_eigenvalues(model, loss_fn, (x, y), k=1, tol=tol, seed=seed))


def ours_trace(model, x, y, seed, method, matvecs):
    from lightning_sharpness.measures import hessian_trace

    return float(hessian_trace(model, loss_fn, (x, y), matvecs=matvecs, method=method, seed=seed))


def call(name, model, x, y, seed, setting):
    if name == "pyhessian_eig":
        return pyhessian_eig(model, x, y, seed)
    if name == "pyhessian_trace":
        return pyhessian_trace(model, x, y, seed)
    if name == "ours_eig":
        return ours_eig(model, x, y, seed, setting)
    return ours_trace(model, x, y, seed, *setting)


# ---------------------------------------------------------------------------------------------- subprocess jobs
def _timing_job(name, setting, queue):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import pyhessian  # noqa: F401  (imports are not part of the measurement)

    import lightning_sharpness.measures  # noqa: F401

    model, x, y = make()
    call(name, model, x, y, -1, setting)  # warm-up
    times = []
    for s in TIME_SEEDS:
        start = time.perf_counter()
        call(name, model, x, y, s, setting)
        times.append(time.perf_counter() - start)
    with PeakMemory() as mem:
        call(name, model, x, y, 0, setting)
    queue.put((times, mem.peak))


def _cost_job(queue):
    """Seconds of one gradient, one HVP through the held graph, the first HVP (graph build included), and one
    forward-over-reverse HVP per vector in a vmap block of 16: medians of interleaved repeats."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from lightning_sharpness.curvature import HessianOperator

    model, x, y = make()
    params = [p for p in model.parameters()]
    held = HessianOperator(model, loss_fn, (x, y))
    vm = HessianOperator(model, loss_fn, (x, y), backend="vmap")
    v = torch.randn(held.dim)
    V = torch.randn(held.dim, 16)

    def first():
        op = HessianOperator(model, loss_fn, (x, y))
        op @ v

    jobs = {
        "gradient": lambda: torch.autograd.grad(loss_fn(model, (x, y)), params),
        "hvp_held": lambda: held @ v,
        "hvp_first": first,
        "hvp_vmap16": lambda: vm @ V,
    }
    for f in jobs.values():
        f()
    times = {k: [] for k in jobs}
    for _ in range(15):
        for k, f in jobs.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(t) for k, t in times.items()}
    med["hvp_vmap16"] /= 16
    queue.put((med, held.dim, held.graph_bytes))


def _reference_job(queue):
    torch.set_num_threads(1)
    from lightning_sharpness.curvature import HessianOperator

    model, x, y = make()
    op = HessianOperator(model, loss_fn, (x, y), chunk_size=64)
    H = op.dense().double()
    H = (H + H.T) / 2
    eigs = torch.linalg.eigvalsh(H)
    queue.put((float(eigs[-1]), float(torch.diagonal(H).sum()), float(eigs[-2]), op.dim))


def _accuracy_job(lam, tr, queue):
    """Relative errors over the seeds of PyHessian and of ours along the ladders, walked from the cheapest
    setting up to the first that is at least as accurate as PyHessian (timing is not measured here)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    model, x, y = make()
    ph_eig = _rel([pyhessian_eig(model, x, y, s) for s in EIG_SEEDS], lam)
    ph_tr = _rel([pyhessian_trace(model, x, y, s) for s in TRACE_SEEDS], tr)
    eig = None
    for tol in LANCZOS_TOLS:
        errs = _rel([ours_eig(model, x, y, s, tol) for s in EIG_SEEDS], lam)
        eig = (tol, errs)
        if statistics.median(errs) <= statistics.median(ph_eig) and max(errs) <= max(ph_eig):
            break
    traces = {}
    for method, ladder in (("hutchinson", HUTCHINSON_MATVECS), ("hutch++", HUTCHPP_MATVECS)):
        for m in ladder:
            errs = _rel([ours_trace(model, x, y, s, method, m) for s in TRACE_SEEDS], tr)
            if _rms(errs) <= _rms(ph_tr):
                traces[method] = (m, errs)
                break
    queue.put((ph_eig, ph_tr, eig, traces))


def run(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


# ---------------------------------------------------------------------------------------------- report
def _rel(values, truth):
    return [abs(v - truth) / abs(truth) for v in values]


def _rms(errs):
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def main() -> None:
    t0 = time.perf_counter()
    lam, tr, lam2, dim = run(_reference_job)
    ph_eig, ph_tr, (tol, our_eig), traces = run(_accuracy_job, lam, tr)
    # The trace: the estimator reaching PyHessian's RMS error with fewer products (Hutch++ on a tie).
    method = min(traces, key=lambda k: (traces[k][0], k != "hutch++")) if traces else "hutchinson"
    m, our_tr = traces.get(method, (HUTCHINSON_MATVECS[-1], [float("nan")]))
    trace_setting = (method, m)
    other = {k: v[0] for k, v in traces.items() if k != method}

    jobs = [("ours_eig", tol), ("pyhessian_eig", None), ("ours_trace", trace_setting), ("pyhessian_trace", None)]
    times = {name: [] for name, _ in jobs}
    peaks = {name: [] for name, _ in jobs}
    for _ in range(ROUNDS):
        for name, setting in jobs:
            t, peak = run(_timing_job, name, setting)
            times[name] += t
            peaks[name].append(peak)
    cost, _, graph_bytes = run(_cost_job)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: max(v) / 2**20 for k, v in peaks.items()}

    print(f"CNN with BatchNorm (eval), {dim} parameters, batch 128 of 3x16x16, float32, CPU, 1 thread per process")
    print(f"ground truth (dense Hessian): top eigenvalue {lam:.6g} (next {lam2:.6g}), trace {tr:.6g}")
    print("PyHessian defaults: eigenvalues(top_n=1) tol 1e-3 / maxIter 100; trace() tol 1e-3 / maxIter 100")
    print(
        f"ours at matched accuracy: hessian_eigenvalues(tol={tol}), "
        f"hessian_trace(method={trace_setting[0]!r}, matvecs={trace_setting[1]})"
        + (f" (the other estimator needs {other})" if other else "")
    )
    print()
    print(
        f"{'measure':15s} {'method':10s} {'rel. error (median / max / RMS)':>33s} {'time (median)':>14s} "
        f"{'peak tensors':>13s}"
    )
    rows = (
        ("top eigenvalue", "ours_eig", our_eig, f"{len(EIG_SEEDS)} seeds"),
        ("", "pyhessian_eig", ph_eig, ""),
        ("trace", "ours_trace", our_tr, f"{len(TRACE_SEEDS)} seeds"),
        ("", "pyhessian_trace", ph_tr, ""),
    )
    for what, name, errs, _ in rows:
        label = "ours" if name.startswith("ours") else "PyHessian"
        print(
            f"{what:15s} {label:10s} {statistics.median(errs):10.2e} / {max(errs):8.2e} / {_rms(errs):8.2e} "
            f"{1e3 * med[name]:11.1f} ms {peak[name]:10.2f} MB"
        )
    print()
    pairs = (("top eigenvalue", "ours_eig", "pyhessian_eig"), ("trace", "ours_trace", "pyhessian_trace"))
    for what, ours, theirs in pairs:
        print(
            f"{what:15s} time ours / PyHessian = {med[ours] / med[theirs]:.2f}   "
            f"peak memory ours / PyHessian = {peak[ours] / peak[theirs]:.2f}"
        )
    print()
    g = cost["gradient"]
    print(
        f"one gradient {1e3 * g:.2f} ms; HVP / gradient: {cost['hvp_held'] / g:.2f} through the held graph, "
        f"{cost['hvp_first'] / g:.2f} for the first (graph build included), "
        f"{cost['hvp_vmap16'] / g:.2f} per vector forward-over-reverse (vmap block of 16)"
    )
    print(f"held gradient graph: {graph_bytes / 2**20:.2f} MB of saved tensors")
    print(f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
