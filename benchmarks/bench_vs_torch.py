"""Side-by-side timing: the JAX PrinMix / Delta-CoMe pipeline vs a Delta-CoMe-style PyTorch pipeline written
here (SVD, then GPTQ on V by bit groups, then GPTQ on U with per-column widths and Hessian Σ V̂ H V̂ᵀ Σ),
on the same machine, the same matrix and the same budget. Prints a table and the time ratios.

    python benchmarks/bench_vs_torch.py --shape 1024 1024 --repeat 2

Timings are warm (the JAX side is called once first so XLA compilation is excluded; its cold time is
printed too). The PyTorch pipeline follows Delta-CoMe's published recipe (2 indices at 8 bits, 32 at 3 bits,
2-bit indices filling the budget); its output error is printed next to the JAX results as a sanity check.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from prinmix_jax.synthetic import long_tailed_delta  # noqa: E402


# ----- PyTorch Delta-CoMe-style pipeline ----------------------------------------------------------
def _quant(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def _minmax(x, maxq, dim):
    xmin = torch.clamp(x.amin(dim=dim, keepdim=True), max=0)
    xmax = torch.clamp(x.amax(dim=dim, keepdim=True), min=0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both0, -1.0, xmin), torch.where(both0, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    return scale, torch.round(-xmin / scale)


def _hinv_upper(h, damp):
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    lo = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(lo)
    return torch.linalg.cholesky(hinv, upper=True), dead


def gptq_rows(w, h, bits, group, damp=0.01, block=128):
    """GPTQ of ``w`` (rows x cols) with Hessian ``h`` (cols x cols) at one width, min-max scales per row and
    per group of ``group`` columns (fixed when the group starts), act-order off."""
    w = w.clone()
    hu, dead = _hinv_upper(h, damp)
    w[:, dead] = 0
    maxq = 2 ** bits - 1
    q = torch.zeros_like(w)
    cols = w.shape[1]
    scale = zero = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        hb = hu[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            if c % group == 0:
                scale, zero = _minmax(w[:, c:c + group] if j == 0 else
                                      torch.cat([w1[:, j:], w[:, i2:]], 1)[:, :group], maxq, 1)
            qc = _quant(w1[:, j:j + 1], scale, zero, maxq)
            q[:, c:c + 1] = qc
            e = (w1[:, j:j + 1] - qc) / hb[j, j]
            w1[:, j:] -= e @ hb[j:j + 1, j:]
            err1[:, j:j + 1] = e
        w[:, i2:] -= err1 @ hu[i1:i2, i2:]
    return q


def gptq_columns(w, h, col_bits, group, damp=0.01):
    """GPTQ of ``w`` (rows x cols) where column j has width ``col_bits[j]`` and its own min-max scales per group
    of ``group`` rows (U's layout: each singular index's column quantised at that index's width)."""
    w = w.clone()
    hu, dead = _hinv_upper(h, damp)
    w[:, dead] = 0
    q = torch.zeros_like(w)
    rows = w.shape[0]
    ng = math.ceil(rows / group)
    for j in range(w.shape[1]):
        maxq = 2 ** int(col_bits[j]) - 1
        col = w[:, j]
        pad = ng * group - rows
        cg = torch.nn.functional.pad(col, (0, pad)).reshape(ng, group)
        scale, zero = _minmax(cg, maxq, 1)
        qc = _quant(cg, scale, zero, maxq).reshape(-1)[:rows]
        q[:, j] = qc
        e = (col - qc) / hu[j, j]
        w[:, j:] -= e[:, None] @ hu[j:j + 1, j:]
    return q


def deltacome_torch(delta, h, budget_bits, group=128, damp=0.01):
    """Delta-CoMe-style compression in PyTorch: returns the reconstructed delta."""
    m, n = delta.shape
    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    cost = lambda b: 8 * b * (math.ceil(m / 8) + math.ceil(n / 8)) + 24 * (math.ceil(m / group) + math.ceil(n / group)) + 40  # noqa
    widths, used = [], 0
    for i in range(len(s)):
        b = 8 if i < 2 else 3 if i < 34 else 2
        if used + cost(b) > budget_bits:
            break
        widths.append(b)
        used += cost(b)
    k = len(widths)
    widths = torch.tensor(widths)
    v = vt[:k]
    vq = torch.zeros_like(v)
    for b in torch.unique(widths).tolist():  # GPTQ on V by bit groups
        rows = torch.nonzero(widths == b).reshape(-1)
        vq[rows] = gptq_rows(v[rows], h, b, group, damp)
    sk = s[:k]
    z = sk[:, None] * vq                     # inputs U sees: Σ V̂ x
    g = z @ h @ z.T                          # Σ V̂ H V̂ᵀ Σ
    uq = gptq_columns(u[:, :k], g, widths, group, damp)  # no RTC: target U itself
    return (uq * sk[None, :]) @ vq


def _rel_err(delta, approx, h):
    e = delta - approx
    return math.sqrt(float(torch.sum((e @ h) * e) / torch.sum((delta @ h) * delta)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=(1024, 1024), metavar=("M", "N"))
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--repeat", type=int, default=2, help="warm repetitions (best is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    import jax

    from prinmix_jax import CompressionConfig, compress_matrix, output_error

    if args.threads:
        torch.set_num_threads(args.threads)
    m, n = args.shape
    delta, hess = long_tailed_delta(m, n, seed=0, tokens=max(4096, n))
    cfg = CompressionConfig(ratio=args.ratio)
    budget = cfg.budget_bits(m, n)
    print(f"# {m}x{n} long-tailed delta, ratio {args.ratio:g}, budget {budget // 8} bytes; jax {jax.__version__} "
          f"({jax.devices()[0].platform}, {len(jax.devices())} device(s)), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {platform.machine()}, {os.cpu_count()} cpus")
    td, th = torch.from_numpy(delta), torch.from_numpy(hess)
    torch_times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        rec = deltacome_torch(td, th, budget)
        torch_times.append(time.perf_counter() - t)
    t_torch = min(torch_times)
    err_torch = _rel_err(td.double(), rec.double(), th.double())
    rows = [("torch Delta-CoMe-style (this script)", None, t_torch, err_torch)]
    for method in ("deltacome", "prinmix"):
        t = time.perf_counter()
        jax.block_until_ready(compress_matrix(delta, hess, cfg, method).reconstruct())
        cold = time.perf_counter() - t
        warm = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            cm = compress_matrix(delta, hess, cfg, method)
            jax.block_until_ready(cm.reconstruct())
            warm.append(time.perf_counter() - t)
        rows.append((f"JAX {method}", cold, min(warm), output_error(delta, cm.reconstruct(), hess)))
    print("| pipeline | cold s | warm s | rel. output error | time / torch |")
    print("|---|---:|---:|---:|---:|")
    for name, cold, warm, err in rows:
        print(f"| {name} | {'-' if cold is None else f'{cold:.2f}'} | {warm:.2f} | {err:.4f} | "
              f"{warm / t_torch:.2f} |")
    print(f"ratio JAX prinmix / torch Delta-CoMe-style (warm): {rows[2][2] / t_torch:.2f}; "
          f"JAX deltacome / torch: {rows[1][2] / t_torch:.2f}")


if __name__ == "__main__":
    main()
