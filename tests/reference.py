"""Plain-PyTorch ground truth for the SAM family, written from the papers' definitions (no Lightning, no engine).

One step on a batch (x, y) with loss L:
  1. the ordinary pass: L(w) and its gradient (it updates BatchNorm running statistics);
  2. for each chunk c of m examples (the whole batch when m is None): g_c = grad L_c(w),
     e_c = rho * T^2 g_c / (||T g_c|| + 1e-12) (or rho * T^2 g_c unnormalized), T = 1 or |w| + eta;
  3. the descent gradient is sum_c |c|/n * grad L_c(w + e_c), with normalization statistics restored;
  4. optional clipping of that gradient, then the optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers(recurse=False)
    ]


def ascent(params, grads, rho, eta=None, normalize=True):
    scales = [torch.ones_like(p) if eta is None else p.detach().abs() + eta for p in params]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads)))
    factor = rho / (norm + 1e-12) if normalize else rho
    return [t * t * g * factor for t, g in zip(scales, grads)]


def grads_of(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def sam_step(
    model,
    optimizer,
    x,
    y,
    rho,
    eta=None,
    normalize=True,
    m=None,
    select=None,
    bn_update="first",
    clip_norm=None,
    loss_fn=F.cross_entropy,
):
    """One SAM-family step; returns (L(w), L(w + e)) of the batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    perturbed = [p for n, p in model.named_parameters() if p.requires_grad and (select is None or select(n, p))]
    loss = loss_fn(model(x), y)
    full_grads = grads_of(loss, params)
    saved_stats = [b.clone() for b in norm_buffers(model)]
    n = x.shape[0]
    chunks = (
        [(x, y, 1.0)]
        if m is None or m >= n
        else [(x[s : s + m], y[s : s + m], min(m, n - s) / n) for s in range(0, n, m)]
    )
    total = [torch.zeros_like(p) for p in params]
    perturbed_loss = 0.0
    for xc, yc, weight in chunks:
        if m is None or m >= n:
            position = {id(p): i for i, p in enumerate(params)}
            g = [full_grads[position[id(p)]] for p in perturbed]
        else:
            g = grads_of(loss_fn(model(xc), yc), perturbed)
        e = ascent(perturbed, g, rho, eta, normalize)
        saved = [p.detach().clone() for p in perturbed]
        with torch.no_grad():
            for p, d in zip(perturbed, e):
                p.add_(d)
        lp = loss_fn(model(xc), yc)
        for t, gp in zip(total, grads_of(lp * weight, params)):
            if gp is not None:
                t.add_(gp)
        perturbed_loss += weight * lp.item()
        with torch.no_grad():
            for p, w in zip(perturbed, saved):
                p.copy_(w)
    if bn_update == "first":
        with torch.no_grad():
            for b, s in zip(norm_buffers(model), saved_stats):
                b.copy_(s)
    for p, t in zip(params, total):
        p.grad = t
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), perturbed_loss


def erm_step(model, optimizer, x, y, loss_fn=F.cross_entropy):
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def reference_fp16_sam(net, x, y, rho, steps=4, batch_size=16, init_scale=2.0**16):
    """SAM with autocast(fp16) and a GradScaler in plain PyTorch: scale, unscale, step, update."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    params = list(net.parameters())
    for i in range(steps):
        xb, yb = x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(net(xb).float(), yb)
        scaler.scale(loss).backward()
        grads = [p.grad / scaler.get_scale() for p in params]
        e = ascent(params, grads, rho)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, d in zip(params, e):
                p.add_(d)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            perturbed = F.cross_entropy(net(xb).float(), yb)
        scaler.scale(perturbed).backward()
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return scaler


class PaperBSAM:
    """Bayesian SAM, Algorithm 1 of Moellenhoff & Khan (ICLR 2023), for a model whose every parameter trains: noise
    of variance ``1 / (N s)`` drawn from ``generator`` (one ``torch.normal`` per parameter, in order), the noisy
    gradient ``g_n``, the ascent ``rho g_n / s`` from the mean, the gradient ``g`` there, then at the mean
    ``m <- lerp(m, g + wd w, 1 - b1)``, ``s <- lerp(s, sqrt(s) |g_n| + wd + damping, 1 - b2)``, ``w -= lr m / s``."""

    def __init__(self, params, num_data, lr, weight_decay, rho, damping, seed, betas=(0.9, 0.999)):
        self.params = list(params)
        self.n, self.lr, self.wd, self.rho, self.damping, self.betas = num_data, lr, weight_decay, rho, damping, betas
        self.generator = torch.Generator().manual_seed(seed)
        self.s = [torch.ones_like(p) for p in self.params]
        self.m = [torch.zeros_like(p) for p in self.params]

    def step(self, gradient_at) -> None:
        """``gradient_at()``: the gradients of the batch's loss at the current weights."""
        params, s, m = self.params, self.s, self.m
        mean = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, si in zip(params, s):
                p.add_(torch.normal(0.0, (1.0 / (self.n * si)).sqrt(), generator=self.generator))
        g_n = gradient_at()
        with torch.no_grad():
            for p, w, gi, si in zip(params, mean, g_n, s):
                p.copy_(w + self.rho * gi / si)
        g = gradient_at()
        b1, b2 = self.betas
        with torch.no_grad():
            for p, w, gi, gn, si, mi in zip(params, mean, g, g_n, s, m):
                p.copy_(w)
                mi.lerp_(gi + self.wd * p, 1 - b1)
                si.lerp_(si.sqrt() * gn.abs() + self.wd + self.damping, 1 - b2)
                p.sub_(self.lr * mi / si)
