"""Benchmark: top eigenvalue and trace of the Hessian, ours against PyHessian 0.1, curvlinops-for-pytorch 3.0.1 and
hessian-eigenthings 1.0.0a5, on three model sizes, CPU, float32, one thread per process.

Models (eval mode, cross-entropy, one batch):

* ``cnn``: a small CNN with BatchNorm, 4,010 parameters, 128 images 3x16x16 (running statistics from 5 passes);
* ``mlp``: a 100-400-400-10 ReLU MLP, 204,810 parameters, 256 examples labelled by a noisy tanh teacher, after 40 SGD
  steps (its top two eigenvalues are 5% apart);
* ``resnet``: a ResNet-like CNN (stem, five residual blocks of two 3x3 convolutions with BatchNorm, 32-64-128 channels,
  global average pooling), 954,922 parameters, 4 images 3x8x8 (small inputs keep a product near 50 ms: the size of
  the parameter vectors is what this model is for).

Ground truth: the top eigenvalue by ARPACK (``scipy.sparse.linalg.eigsh``, ``tol=1e-7``, float64 iterations on our
float32 products); the trace exactly, as the trace of the generalized Gauss-Newton matrix from per-example
Jacobians: every parameter enters these networks piecewise linearly (ReLU, max-pooling, eval-mode BatchNorm,
residual sums, linear layers), so each diagonal entry of the network's second derivative is zero and
``tr(H) = tr(GGN)``. The CNN's dense Hessian checks both (printed).

Methods, each library at the settings it offers (walked from cheap to expensive):

* top eigenvalue: ours ``lanczos_eigs`` (what ``hessian_eigenvalues`` runs) over a ladder of ``tol``; PyHessian's
  power iteration over ``tol`` (``maxIter=1000``); curvlinops' ``HessianLinearOperator`` with ARPACK over
  ``(ncv, tol)``; hessian-eigenthings' ``lanczos`` over ``max_iter``. "Time to 1e-2 / 1e-3": the median time of the
  cheapest rung whose worst relative error over the 10 seeds is within the target (a rung is abandoned at its first
  seed that misses).
* trace: efficiency = median time x (relative RMS error over 10 seeds)^2, lower is better; for plain Monte Carlo it
  does not depend on the number of products. Defaults: ours ``hessian_trace`` (Hutch++, 99 products), PyHessian
  ``trace()`` (tol 1e-3, maxIter 100), hessian-eigenthings ``trace()`` (Hutch++, 100); curvlinops has no default
  budget. Best: the lowest efficiency over Hutchinson, Hutch++ and XTrace at 24-99 products.

Timing: each library in fresh processes, two rounds with the libraries' order reversed in the second (the machine is
shared), a cheap warm-up call first in each process; the medians of every timed call of a setting. Peak memory: the
peak of live tensor bytes during one call (the profiler's memory timeline), and the process's resident-set high-water
mark above its setup over all its calls (which includes what the allocator keeps between calls). HVP /
gradient: one product through each library's own path (ours: the held gradient graph; PyHessian: its held graph;
curvlinops: forward-over-reverse ``vmap`` blocks of 16; hessian-eigenthings: graph rebuilt per product) over one
gradient (forward + backward), medians of interleaved repeats.

    python benchmarks/measures.py            # the full tables; about 20 minutes on an idle machine (the [bench] extra)
    python benchmarks/measures.py --memory   # only the peak tensor memory of one call per library
    python benchmarks/measures.py --quick    # a smoke test on the CNN, under a minute (missing libraries skipped)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "measures_benchmark.md"
LIBRARIES = ("ours", "pyhessian", "curvlinops", "eigenthings")
MODULES = {"pyhessian": "pyhessian", "curvlinops": "curvlinops", "eigenthings": "hessian_eigenthings"}
TARGETS = (1e-2, 1e-3)

# Eigenvalue ladders, cheapest first.
EIG_LADDER = {
    "ours": [0.3, 0.1, 0.05, 0.03, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 3e-4],
    "pyhessian": [3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5],
    "curvlinops": [(6, 0.1), (8, 0.1), (10, 0.1), (12, 0.05), (16, 0.02), (20, 1e-2), (20, 1e-3), (30, 1e-4)],
    "eigenthings": [4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 60],
}
# Trace settings: (method, products); the first of each library is its default where it has one.
TRACE = {
    "ours": [("hutch++", 99), ("hutchinson", 48), ("hutch++", 48), ("xtrace", 24), ("xtrace", 48), ("xtrace", 98)],
    "pyhessian": [("default", 100), ("hutchinson", 48)],
    "curvlinops": [("hutchinson", 48), ("hutch++", 48), ("xtrace", 48), ("xtrace", 98)],
    "eigenthings": [("hutch++", 100), ("hutchinson", 48)],
}
TRACE_RESNET = {  # the 1M model: fewer settings, to keep the run near 20 minutes
    "ours": [("hutch++", 99), ("hutchinson", 48), ("xtrace", 48)],
    "pyhessian": [("default", 100), ("hutchinson", 48)],
    "curvlinops": [("hutchinson", 48), ("xtrace", 48)],
    "eigenthings": [("hutch++", 100), ("hutchinson", 48)],
}
TRACE_QUICK = {  # --quick: one cheap setting each, to exercise every path
    "ours": [("xtrace", 12)],
    "pyhessian": [("hutchinson", 12)],
    "curvlinops": [("xtrace", 12)],
    "eigenthings": [("hutchinson", 12)],
}
HAS_DEFAULT = {"ours": True, "pyhessian": True, "curvlinops": False, "eigenthings": True}


# ---------------------------------------------------------------------------------------------- models
def make_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 3, 16, 16, generator=g), torch.randint(0, 10, (128,), generator=g)
    model.train()
    with torch.no_grad():  # realistic running statistics
        for _ in range(5):
            model(torch.randn(128, 3, 16, 16, generator=g))
    return model.eval(), x, y


def make_mlp(seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(100, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(256, 100, generator=g)
    with torch.no_grad():
        y = (teacher(x) + 0.5 * torch.randn(256, 10, generator=g)).argmax(1)
    model = nn.Sequential(nn.Linear(100, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(
            _Block(32, 64, 1), _Block(64, 64, 1), _Block(64, 128, 2), _Block(128, 128, 1), _Block(128, 128, 1)
        )
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def make_resnet():
    torch.manual_seed(0)
    model = ResNetLike()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(64, 3, 8, 8, generator=g))
    return model.eval(), x, y


MODELS = {"cnn": make_cnn, "mlp": make_mlp, "resnet": make_resnet}
TITLES = {"cnn": "CNN 4k", "mlp": "MLP 200k", "resnet": "ResNet 1M"}


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _import_ours():
    """Our curvature package without ``lightning_sharpness/__init__`` (it imports Lightning, seconds per fresh
    process, none of it used here); the package's submodules import as usual."""
    if "lightning_sharpness" not in sys.modules:
        pkg = types.ModuleType("lightning_sharpness")
        pkg.__path__ = [str(ROOT / "lightning_sharpness")]
        sys.modules["lightning_sharpness"] = pkg
    import lightning_sharpness.curvature as curvature

    return curvature


# ---------------------------------------------------------------------------------------------- the libraries
class Library:
    """One library's calls on one model: ``eig(seed, setting)``, ``trace(seed, setting)``, ``costs()``."""

    def __init__(self, name: str, model, x, y) -> None:
        self.name, self.model, self.x, self.y = name, model, x, y
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        getattr(self, f"_setup_{name}")()

    # ---- ours
    def _setup_ours(self):
        self.cv = _import_ours()

    def _ours_op(self):
        return self.cv.HessianOperator(self.model, loss_fn, (self.x, self.y))

    def eig_ours(self, seed, tol):
        res = self.cv.lanczos_eigs(self._ours_op(), k=1, tol=tol, generator=torch.Generator().manual_seed(seed))
        return float(res.eigenvalues[0])

    def trace_ours(self, seed, setting):
        method, m = setting
        fn = {"hutchinson": self.cv.hutchinson, "hutch++": self.cv.hutchpp, "xtrace": self.cv.xtrace}[method]
        return fn(self._ours_op(), m, torch.Generator().manual_seed(seed)).value

    # ---- PyHessian
    def _setup_pyhessian(self):
        from pyhessian import hessian

        self.ph = hessian

    def _ph(self):
        h = self.ph(self.model, nn.CrossEntropyLoss(), data=(self.x, self.y), cuda=False)
        return h

    def eig_pyhessian(self, seed, tol):
        torch.manual_seed(seed)
        value = float(self._ph().eigenvalues(maxIter=1000, tol=tol, top_n=1)[0][0])
        self.model.zero_grad(set_to_none=True)  # PyHessian's backward(create_graph=True) wrote .grad
        return value

    def trace_pyhessian(self, seed, setting):
        method, m = setting
        torch.manual_seed(seed)
        # tol=-inf never stops early: exactly m probes
        tr = self._ph().trace(maxIter=m, tol=1e-3 if method == "default" else -math.inf)
        self.model.zero_grad(set_to_none=True)
        return float(sum(tr) / len(tr))

    # ---- curvlinops
    def _setup_curvlinops(self):
        import curvlinops
        from scipy.sparse.linalg import eigsh

        self.cl, self.eigsh = curvlinops, eigsh

    def _cl(self):
        return self.cl.HessianLinearOperator(
            self.model, nn.CrossEntropyLoss(), self.params, [(self.x, self.y)], check_deterministic=False
        )

    def eig_curvlinops(self, seed, setting):
        import numpy as np

        ncv, tol = setting
        v0 = np.random.default_rng(seed).standard_normal(self.dim)
        values = self.eigsh(self._cl().to_scipy(), k=1, which="LA", ncv=ncv, tol=tol, v0=v0, return_eigenvectors=False)
        return float(values[0])

    def trace_curvlinops(self, seed, setting):
        method, m = setting
        fn = {"hutchinson": self.cl.hutchinson_trace, "hutch++": self.cl.hutchpp_trace, "xtrace": self.cl.xtrace}
        torch.manual_seed(seed)
        return float(fn[method](self._cl(), m))

    # ---- hessian-eigenthings
    def _setup_eigenthings(self):
        import hessian_eigenthings as he

        self.he = he

    def _he(self):
        return self.he.HessianOperator(self.model, [(self.x, self.y)], self.he.supervised_loss(nn.CrossEntropyLoss()))

    def eig_eigenthings(self, seed, max_iter):
        res = self.he.lanczos(self._he(), k=1, max_iter=max_iter, which="LA", seed=seed)
        return float(res.eigenvalues[0])

    def trace_eigenthings(self, seed, setting):
        method, m = setting
        return float(self.he.trace(self._he(), num_matvecs=m, method=method, seed=seed).estimate)

    # ---- dispatch
    def eig(self, seed, setting):
        return getattr(self, f"eig_{self.name}")(seed, setting)

    def trace(self, seed, setting):
        return getattr(self, f"trace_{self.name}")(seed, setting)

    def warm_up(self):
        self.eig(10_000, EIG_LADDER[self.name][0])

    def costs(self, repeats: int = 7) -> dict:
        """Seconds of one gradient and of one product through the library's own path (per vector)."""
        v = torch.randn(self.dim)
        flat = [t.reshape(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in self.params]), self.params)]
        if self.name == "ours":
            op = self._ours_op()
            op.gradient()  # the held graph
            V = torch.randn(16, self.dim)
            product, per = (lambda: op.matmat_rows(V)), 16
        elif self.name == "pyhessian":
            from pyhessian.utils import hessian_vector_product

            h = self._ph()
            product, per = (lambda: hessian_vector_product(h.gradsH, h.params, flat)), 1
        elif self.name == "curvlinops":
            op, V = self._cl(), torch.randn(self.dim, 16)
            product, per = (lambda: op @ V), 16
        else:
            op = self._he()
            product, per = (lambda: op.matvec(v)), 1

        def gradient():
            return torch.autograd.grad(loss_fn(self.model, (self.x, self.y)), self.params)

        jobs = {"gradient": (gradient, 1), "hvp": (product, per)}
        for f, _ in jobs.values():
            f()
        times = {k: [] for k in jobs}
        for _ in range(repeats):
            for k, (f, n) in jobs.items():
                start = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - start) / n)
        self.model.zero_grad(set_to_none=True)
        return {k: statistics.median(t) for k, t in times.items()}


# ---------------------------------------------------------------------------------------------- ground truth
def ggn_trace(model, x, y, chunk_bytes: float = 2**28) -> float:
    """``tr(GGN) = (1/N) sum_n tr(J_n^T (diag p_n - p_n p_n^T) J_n)`` from per-example Jacobians ``J_n`` of the
    logits (float64 sums): ``sum_c p_c |J_c|^2 - |sum_c p_c J_c|^2`` per example."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def logits(p, xi):
        return torch.func.functional_call(model, (p, buffers), (xi[None],))[0]

    dim = sum(p.numel() for p in params.values())
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).double()
    classes = probs.shape[1]
    step = max(1, int(chunk_bytes // (classes * dim * 4)))
    total = 0.0
    for start in range(0, x.shape[0], step):
        J = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params, x[start : start + step])
        p = probs[start : start + step]
        for t in J.values():
            t = t.reshape(t.shape[0], classes, -1).double()  # (b, C, numel)
            total += float((p * t.pow(2).sum(2)).sum() - torch.einsum("bc,bcn->bn", p, t).pow(2).sum())
    return total / x.shape[0]


def _reference_job(model_name: str, dense: bool) -> dict:
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    torch.set_num_threads(1)
    cv = _import_ours()
    model, x, y = MODELS[model_name]()
    op = cv.HessianOperator(model, loss_fn, (x, y))
    A = LinearOperator(
        (op.dim, op.dim), matvec=lambda v: (op @ torch.from_numpy(np.ravel(v)).float()).double().numpy(), dtype=float
    )
    top = eigsh(A, k=2, which="LA", tol=1e-7, v0=np.random.default_rng(0).standard_normal(op.dim))[0]
    out = {"dim": op.dim, "lam": float(top[-1]), "lam2": float(top[0]), "trace": ggn_trace(model, x, y)}
    if dense:
        H = cv.HessianOperator(model, loss_fn, (x, y), chunk_size=64).dense().double()
        H = (H + H.T) / 2
        out["dense_lam"], out["dense_trace"] = float(torch.linalg.eigvalsh(H)[-1]), float(torch.trace(H))
    return out


# ---------------------------------------------------------------------------------------------- worker
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(model_name: str, lib: str, plan: dict) -> dict:
    """One library in one process: the eigenvalue ladder walk (from ``plan["eig_from"]``, seeds ``plan["seeds"]``;
    a rung is abandoned at its first seed off the target), the trace settings, the costs."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    model, x, y = MODELS[model_name]()
    L = Library(lib, model, x, y)
    L.warm_up()
    base = _rss_mib()
    lam = plan["lam"]
    out = {"eig": {}, "trace": {}, "costs": None}

    def timed(f, *args):
        start = time.perf_counter()
        value = f(*args)
        return value, time.perf_counter() - start

    ladder = EIG_LADDER[lib]
    for target in plan["eig_targets"]:
        rung = plan["eig_from"].get(target, 0)
        while rung < len(ladder):
            setting = ladder[rung]
            seeds = plan["eig_seeds"](rung, target)
            ok = True
            for s in seeds:
                key = (rung, s)
                if key not in out["eig"]:
                    out["eig"][key] = timed(L.eig, s, setting)
                if abs(out["eig"][key][0] - lam) / abs(lam) > target:
                    ok = False
                    break
            if ok:
                break
            rung += 1
    for setting in plan["trace_settings"]:
        for s in plan["trace_seeds"]:
            out["trace"][(setting, s)] = timed(L.trace, s, setting)
    if plan["costs"]:
        out["costs"] = L.costs()
    out["peak_mib"] = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    return out


def _in_process(target, *args):
    return target(*args)


def _fresh(target, *args):
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(target, args)


# ---------------------------------------------------------------------------------------------- the run
def _rel(value, truth):
    return abs(value - truth) / abs(truth)


def _rms(errs):
    return math.sqrt(sum(e * e for e in errs) / len(errs))


class _Seeds:
    """Picklable seed chooser: round 1 runs ``first``; round 2 the ``rest`` at the rung round 1 reached, and all
    seeds at a rung it has to climb to."""

    def __init__(self, first, rest, start_rungs):
        self.first, self.rest, self.start = list(first), list(rest), start_rungs

    def __call__(self, rung, target):
        if self.start is None:
            return self.first
        return self.rest if rung == self.start.get(target) else self.first + self.rest


def run_model(model_name: str, libs: list[str], seeds: int, quick: bool, run) -> dict:
    t0 = time.perf_counter()
    ref = run(_reference_job, model_name, model_name == "cnn" and not quick)
    print(f"[{time.perf_counter() - t0:5.0f} s] {model_name} reference {ref}", file=sys.stderr, flush=True)
    trace_settings = TRACE_RESNET if model_name == "resnet" else TRACE
    if quick:
        trace_settings = TRACE_QUICK
    half = seeds // 2
    first, rest = range(half), range(half, seeds)
    merged = {lib: {"eig": {}, "trace": {}, "costs": None, "peak_mib": 0.0} for lib in libs}
    reached: dict[str, dict] = {}
    for round_ in (1, 2):
        order = libs if round_ == 1 else libs[::-1]
        for lib in order:
            if round_ == 1:
                plan_seeds, eig_from, trace_seeds = _Seeds(first, rest, None), {}, list(first)
            else:
                ladder_end = {t: reached[lib].get(t, len(EIG_LADDER[lib])) for t in TARGETS}  # unreached: not again
                plan_seeds, eig_from, trace_seeds = _Seeds(first, rest, reached[lib]), ladder_end, list(rest)
            plan = {
                "lam": ref["lam"], "trace": ref["trace"], "eig_targets": TARGETS[:1] if quick else TARGETS,
                "eig_from": eig_from, "eig_seeds": plan_seeds, "trace_settings": trace_settings[lib],
                "trace_seeds": trace_seeds, "costs": round_ == 2,
            }  # fmt: skip
            out = run(_worker, model_name, lib, plan)
            print(f"[{time.perf_counter() - t0:5.0f} s] {model_name} round {round_} {lib}", file=sys.stderr, flush=True)
            m = merged[lib]
            m["eig"].update(out["eig"])
            m["trace"].update(out["trace"])
            m["costs"] = out["costs"] or m["costs"]
            m["peak_mib"] = max(m["peak_mib"], out["peak_mib"])
            if round_ == 1:
                reached[lib] = _reached(out["eig"], ref["lam"], first)
    return {"ref": ref, "libs": merged, "seconds": time.perf_counter() - t0, "seeds": seeds, "quick": quick}


def _reached(eig: dict, lam: float, seeds) -> dict:
    """Per target, the lowest rung on which every seed of ``seeds`` met it (round 1's walk)."""
    out = {}
    for target in TARGETS:
        rungs = sorted({r for r, _ in eig})
        for r in rungs:
            values = [eig.get((r, s)) for s in seeds]
            if all(v is not None and _rel(v[0], lam) <= target for v in values):
                out[target] = r
                break
    return out


def summarize(result: dict) -> dict:
    ref, seeds = result["ref"], result["seeds"]
    rows = {}
    for lib, data in result["libs"].items():
        row = {"peak": data["peak_mib"], "costs": data["costs"]}
        for target in TARGETS:
            best = None
            for r in sorted({r for r, _ in data["eig"]}):
                calls = [data["eig"].get((r, s)) for s in range(seeds)]
                if all(c is not None for c in calls) and max(_rel(c[0], ref["lam"]) for c in calls) <= target:
                    best = (EIG_LADDER[lib][r], statistics.median(c[1] for c in calls))
                    break
            row[target] = best
        traces = {}
        for setting in {s for s, _ in data["trace"]}:
            calls = [data["trace"][(setting, s)] for s in range(seeds) if (setting, s) in data["trace"]]
            err = _rms([_rel(c[0], ref["trace"]) for c in calls])
            t = statistics.median(c[1] for c in calls)
            traces[setting] = {"rms": err, "time": t, "eff": t * err * err, "n": len(calls)}
        row["traces"] = traces
        default = TRACE[lib][0] if HAS_DEFAULT[lib] else None
        row["trace_default"] = (default, traces[default]) if default in traces else None
        best = min(traces.items(), key=lambda kv: kv[1]["eff"]) if traces else None
        row["trace_best"] = best
        rows[lib] = row
    return rows


# ---------------------------------------------------------------------------------------------- report
NAMES = {"ours": "ours", "pyhessian": "PyHessian 0.1", "curvlinops": "curvlinops 3.0.1",
         "eigenthings": "hessian-eigenthings 1.0.0a5"}  # fmt: skip


def _setting(lib, setting):
    if lib == "ours":
        return f"tol={setting:g}"
    if lib == "pyhessian":
        return f"tol={setting:g}"
    if lib == "curvlinops":
        return f"ncv={setting[0]}, tol={setting[1]:g}"
    return f"max_iter={setting}"


def _trace_cell(item):
    if item is None:
        return "—"
    (method, m), r = item
    label = "tol 1e-3" if method == "default" else f"{method} {m}"
    return f"{1e3 * r['eff']:.3g} ({label}: {1e3 * r['time']:.0f} ms, RMS {r['rms']:.2g})"


def table(results: dict, quick: bool) -> str:
    load = os.getloadavg()[0]
    lines = [
        f"**Measures benchmark: ours against PyHessian, curvlinops and hessian-eigenthings**"
        f"{' (QUICK smoke run: 2 seeds, not figures)' if quick else ''}",
        "",
        f"`python benchmarks/measures.py{' --quick' if quick else ''}`; CPU float32, one thread per process, each "
        f"library in fresh processes, two alternating rounds, medians. **The machine was shared** with other jobs "
        f"(2 cores, load average {load:.1f} at the end): ratios within a model are fair (alternating rounds), "
        "absolute times are not. Eigenvalue: the median time of the cheapest setting whose *worst* relative error "
        f"over the seeds is within the target. Trace efficiency: time × (relative RMS error over the seeds)², in "
        "ms, lower is better. HVP / gradient: one product through the library's own path over one gradient "
        "(forward + backward). Peak RSS: the process's resident-set high-water mark above its setup over all its calls "
        "(it includes what the allocator keeps between calls; the peak tensor memory of one call is in the last "
        "table).",
        "",
    ]
    for model_name, result in results.items():
        ref, rows = result["ref"], summarize(result)
        lines.append(
            f"**{TITLES[model_name]}** ({ref['dim']:,} parameters; top eigenvalue {ref['lam']:.5g}, next "
            f"{ref['lam2']:.5g}; trace {ref['trace']:.5g}; {result['seeds']} seeds; {result['seconds']:.0f} s)"
        )
        if "dense_lam" in ref:
            lines[-1] += f"; dense-Hessian check: eigenvalue {ref['dense_lam']:.6g}, trace {ref['dense_trace']:.6g}"
        lines += [
            "",
            "| library | top eig. to 1e-2 | top eig. to 1e-3 | trace eff. at defaults | trace eff. at best "
            "| HVP / gradient | peak RSS MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for lib, row in rows.items():
            cells = []
            for target in TARGETS:
                best = row[target]
                ran = any(k for k in result["libs"][lib]["eig"]) and (target == TARGETS[0] or not result["quick"])
                reached_in = None if best is None else f"{1e3 * best[1]:.0f} ms ({_setting(lib, best[0])})"
                cells.append("—" if not ran else "not reached" if best is None else reached_in)
            c = row["costs"]
            ratio = None if not c else f"{c['hvp'] / c['gradient']:.2f}"
            cost = "—" if not c else f"{ratio} ({1e3 * c['hvp']:.1f} / {1e3 * c['gradient']:.1f} ms)"
            lines.append(
                f"| {NAMES[lib]} | {cells[0]} | {cells[1]} | {_trace_cell(row['trace_default'])} | "
                f"{_trace_cell(row['trace_best'])} | {cost} | {row['peak']:.0f} |"
            )
        lines.append("")
        lines.append("Trace settings (efficiency in ms · RMS error · median time):")
        lines.append("")
        for lib, row in rows.items():
            parts = [
                f"{'tol 1e-3' if k[0] == 'default' else f'{k[0]} {k[1]}'}: {1e3 * v['eff']:.3g} · {v['rms']:.2g} · "
                f"{1e3 * v['time']:.0f} ms"
                for k, v in sorted(row["traces"].items(), key=lambda kv: kv[1]["eff"])
            ]
            lines.append(f"- {NAMES[lib]}: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- peak tensor memory
MEMORY_EIG = {"ours": 1e-3, "pyhessian": 1e-3, "curvlinops": (20, 1e-3), "eigenthings": 20}


def _memory_job(model_name: str, lib: str, kind: str, setting) -> float:
    """Peak bytes one call adds to the resident set of a fresh process, after a warm-up call: the high-water mark
    during the call above the resident set before it. One call only, so nothing an earlier call left to the
    allocator counts (the profiler's tensor timeline of ``peak_memory.py`` crashed on curvlinops' ``vmap``)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    model, x, y = MODELS[model_name]()
    L = Library(lib, model, x, y)
    L.warm_up()
    call = L.eig if kind == "eig" else L.trace
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets the high-water mark (VmHWM) to the current resident set
        f.write("5")
    before = _hwm_mib()
    call(0, setting)
    return max(0.0, _hwm_mib() - before) * 2**20


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_table(models: list[str], libs: list[str], run) -> str:
    lines = [
        "Peak memory of one call (MiB: the resident-set high-water mark during the call above the resident set "
        "before it, in a fresh process after a warm-up call): "
        "the top eigenvalue at "
        + ", ".join(f"{NAMES[lib]} {_setting(lib, MEMORY_EIG[lib])}" for lib in libs)
        + "; the trace at each library's default (curvlinops: XTrace 48).",
        "",
        "| model | " + " | ".join(f"{NAMES[lib]} eig. / trace" for lib in libs) + " |",
        "|---" * (len(libs) + 1) + "|",
    ]
    for model_name in models:
        cells = []
        for lib in libs:
            trace_setting = TRACE[lib][0] if HAS_DEFAULT[lib] else ("xtrace", 48)
            eig = run(_memory_job, model_name, lib, "eig", MEMORY_EIG[lib]) / 2**20
            tr = run(_memory_job, model_name, lib, "trace", trace_setting) / 2**20
            cells.append(f"{eig:.1f} / {tr:.1f}")
            print(f"memory {model_name} {lib}: {cells[-1]}", file=sys.stderr, flush=True)
        lines.append(f"| {TITLES[model_name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: the CNN, 2 seeds, in this process")
    parser.add_argument("--models", default=None, help="comma-separated subset of cnn,mlp,resnet")
    parser.add_argument("--memory", action="store_true", help="only the peak tensor memory of one call per library")
    parser.add_argument("--out", default=None, help=f"where to write the table (default {OUT}; quick: not written)")
    args = parser.parse_args(argv)
    models = args.models.split(",") if args.models else (["cnn"] if args.quick else list(MODELS))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    libs = ["ours"] + [lib for lib in LIBRARIES[1:] if importlib.util.find_spec(MODULES[lib]) is not None]
    missing = [lib for lib in LIBRARIES if lib not in libs]
    if missing:
        print(f"not installed, skipped: {missing} (pip install '.[bench]')", file=sys.stderr)
    torch.set_num_threads(1)
    run = _in_process if args.quick else _fresh
    seeds = 2 if args.quick else 10
    if args.memory:
        text = memory_table(models, libs, run)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    out = args.out or (None if args.quick else OUT)
    results = {}
    for m in models:
        results[m] = run_model(m, libs, seeds, args.quick, run)
        text = table(results, args.quick)
        if out:  # after each model: a long run that is stopped keeps the models it finished
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text + "\n")
    if not args.quick:
        text += "\n" + memory_table(models, libs, run) + "\n"
        if out:
            Path(out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
