"""What other codes for a singular vector would buy (issue 12's "sparsity inside the kept singular vectors" and
"non-uniform levels"), measured on the singular vectors of the demo pair's real fine-tuning delta before building
either: distortion (relative squared error of the vector) against rate (bits per entry, metadata included).

For every decoder-block linear of the demo's SFT pair, the top ``--top`` left and right singular vectors of its
delta, each quantised on its own (one group per vector, as the lean layout stores these short vectors).
"Energy kept per bit" is ``(1 − error) / rate``: what a bit spent on the vector buys.

* the library's grids (``rtn_quantize``, ``"mse-sym"``/``"mse"``) at 1, 2 and 3 bits (the scale is folded
  into σ, so the rate is the width);
* per-vector Lloyd–Max codebooks (non-uniform levels) at 2 and 3 bits, 4 / 8 float16 levels stored per
  vector (Lloyd iterations from the uniform grid);
* sparse ternary codes (ImPart-style sparsity: the entries below a threshold dropped, the others kept as
  ``±a`` with ``a`` their mean magnitude), with the mask counted at its entropy ``H(q)`` (an ideal entropy
  coder: a lower bound on any real mask cost) plus one sign bit per kept entry, at keep fractions ``q``;
* random masks (DARE/ImPart: a seeded mask costs no bytes; kept entries at 1 bit, rescaled by ``1/q``).

    python benchmarks/bench_vector_codes.py
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _entropy(q: float) -> float:
    return 0.0 if q <= 0 or q >= 1 else float(-q * np.log2(q) - (1 - q) * np.log2(1 - q))


def lloyd(x: np.ndarray, levels: np.ndarray, iters: int = 30) -> np.ndarray:
    """Lloyd–Max on the entries of one vector, from ``levels``; returns the dequantised vector."""
    c = np.sort(levels.astype(np.float64))
    for _ in range(iters):
        edges = (c[1:] + c[:-1]) / 2
        idx = np.searchsorted(edges, x)
        for j in range(len(c)):
            sel = idx == j
            if sel.any():
                c[j] = x[sel].mean()
        c = np.sort(c)
    c = c.astype(np.float16).astype(np.float64)            # stored as float16
    return c[np.searchsorted((c[1:] + c[:-1]) / 2, x)]


def ternary(x: np.ndarray, q: float) -> np.ndarray:
    """Keep the fraction ``q`` of largest magnitudes as ``±a`` (``a`` their mean magnitude), zero the rest."""
    k = max(1, int(round(q * x.size)))
    keep = np.argsort(-np.abs(x))[:k]
    out = np.zeros_like(x)
    out[keep] = np.sign(x[keep]) * np.abs(x[keep]).mean()
    return out


def random_mask(x: np.ndarray, q: float, rng) -> np.ndarray:
    """A seeded random mask keeping ``q`` of the entries, kept entries as a 1-bit sign code, rescaled by 1/q."""
    keep = rng.random(x.size) < q
    out = np.zeros_like(x)
    if keep.any():
        out[keep] = np.sign(x[keep]) * np.abs(x[keep]).mean() / q
    return out


def vectors(top: int):
    """Unit-norm top singular vectors (left and right) of every block linear's delta of the demo pair."""
    from prinmix_jax.models import load_hf_params
    from prinmix_jax.sft import FULL, make_sft_pair

    pair = make_sft_pair(FULL, progress=False, log=None)
    b, f = load_hf_params(pair.base), load_hf_params(pair.finetuned)
    out = []
    for i in sorted(f["layers"]):
        layer_b, layer_f = b["layers"][i], f["layers"][i]
        for part in ("self_attn", "mlp"):
            for name, w in layer_f[part].items():
                if "weight" not in w or np.ndim(w["weight"]) != 2:
                    continue
                d = np.asarray(w["weight"], np.float64) - np.asarray(layer_b[part][name]["weight"], np.float64)
                u, _, vt = np.linalg.svd(d, full_matrices=False)
                out += [u[:, i] for i in range(top)] + [vt[i] for i in range(top)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=16, help="singular vectors per side and matrix")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from prinmix_jax.core.quantizer import rtn_quantize

    vecs = vectors(args.top)
    lens = sorted({v.size for v in vecs})
    kurt = np.mean([np.mean(v ** 4) / np.mean(v ** 2) ** 2 for v in vecs])
    rng = np.random.default_rng(0)
    rows = {}

    def add(label, rate, approx):
        rows.setdefault(label, []).append((rate, float(np.sum((v - approx) ** 2) / np.sum(v ** 2))))

    for v in vecs:
        n = v.size
        for bits, grid in ((1, "mse-sym"), (2, "mse-sym"), (3, "mse")):
            deq = np.asarray(rtn_quantize(jnp.asarray(v[None], jnp.float32), jnp.asarray([bits]), None,
                                          jnp.float16, grid)[0][0], np.float64)
            add(f"uniform grid, {bits} bit", bits, deq)
            if bits >= 2:
                add(f"Lloyd–Max, {bits} bit (float16 levels)", bits + 16 * 2 ** bits / n, lloyd(v, np.unique(deq)))
        for q in (0.1, 0.15, 0.25, 0.5, 0.75):
            add(f"sparse ternary, keep {q:.0%} (entropy-coded mask)", _entropy(q) + q, ternary(v, q))
            add(f"random mask, keep {q:.0%} (seeded, 1-bit kept)", q, random_mask(v, q, rng))
    print(f"# {len(vecs)} unit singular vectors of the demo pair's block-linear deltas (top {args.top} per side), "
          f"lengths {lens}, mean kurtosis {kurt:.2f} (Gaussian: 3)")
    print("| code | bits per entry | relative squared error | energy kept per bit |")
    print("|---|---:|---:|---:|")
    for label, vals in rows.items():
        rate = float(np.mean([r for r, _ in vals]))
        err = float(np.mean([e for _, e in vals]))
        print(f"| {label} | {rate:.3f} | {err:.4f} | {(1 - err) / rate:.3f} |")


if __name__ == "__main__":
    main()
