"""The global bit allocation on real error tables: the MCKP solver (default), and the 0/1 MILP (``method="milp"``)
with the exact Lagrangian reduction or on the full problem.

For each block count, a synthetic Llama pair (``prinmix_jax.synthetic.write_llama_pair``) is written, the
data-free error table of every block linear is computed with the library's own ``error_tables`` (what the global scope's
first pass does), and ``allocate_bits_global`` (gap 1e-4, as ``CompressionConfig``) is solved twice, each
in a fresh process so that its peak RSS is its own: with the reduction (the default) and without it
(``reduce=False``, the whole problem handed to HiGHS), and with the default ``method="mckp"``.
Reported: binary variables (pairs) the MILP saw, seconds,
the growth of peak RSS during the solve, and the objective (sum of per-matrix relative errors).

    python benchmarks/bench_ilp_global.py --blocks 8 32
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def solve(tables_file: str, mode: str) -> dict:
    from prinmix_jax import CompressionConfig
    from prinmix_jax.allocation import allocate_bits_global

    z = np.load(tables_file)
    n = len([k for k in z.files if k.startswith("t")])
    tables = [z[f"t{i}"] for i in range(n)]
    costs, budget, widths = list(z["costs"]), int(z["budget"]), tuple(int(b) for b in z["widths"])
    cfg = CompressionConfig()
    before = _rss_mb()
    t = time.perf_counter()
    _, alloc = allocate_bits_global(tables, costs, budget, widths, mip_rel_gap=cfg.ilp_gap, time_limit=600,
                                    reduce=mode != "full", method="mckp" if mode == "mckp" else "milp")
    return {"seconds": time.perf_counter() - t, "objective": alloc.objective, "milp_pairs": alloc.milp_pairs,
            "pairs": int(sum(t.size for t in tables)), "rss_growth_mb": _rss_mb() - before,
            "cost_bytes": alloc.cost_bits // 8, "budget_bytes": budget // 8}


def make_tables(root: str, blocks: int, hidden: int, inter: int, vocab: int) -> str:
    from prinmix_jax import CompressionConfig, error_tables, index_cost_bits
    from prinmix_jax.models.hf_io import CheckpointReader
    from prinmix_jax.synthetic import write_llama_pair

    cfg = CompressionConfig(group_size=64)
    base_dir, ft_dir = write_llama_pair(root, blocks, hidden, inter, vocab)
    base, ft = CheckpointReader(base_dir), CheckpointReader(ft_dir)
    out, costs, budget = {}, [], 0
    names = [n for n in base.names() if n.startswith("model.layers.") and n.endswith("proj.weight")]
    for name in sorted(names):
        d = ft.read(name, np.float32) - base.read(name, np.float32)
        (e,) = error_tables([d], None, cfg)
        out[f"t{len(costs)}"] = np.asarray(e)
        costs.append(index_cost_bits(*d.shape, cfg.bits, cfg.group_size, scale_bits=cfg.scale_bits))
        budget += cfg.budget_bits(*d.shape)
    path = os.path.join(root, f"tables-{blocks}.npz")
    np.savez(path, costs=np.stack(costs), budget=budget, widths=np.asarray(cfg.bits), **out)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--solve", choices=("mckp", "reduced", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--tables", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.solve:
        print(json.dumps(solve(args.tables, args.solve)))
        return
    import platform

    import jax

    print(f"# data-free error tables of every block linear (hidden {args.hidden}, intermediate {args.inter}), "
          f"gap 1e-4, HiGHS; jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cpus")
    print("| blocks | matrices | pairs | mode | MILP binaries | seconds | peak RSS growth MB | objective |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="prinmix-ilp-") as root:
        for n in args.blocks:
            path = make_tables(root, n, args.hidden, args.inter, args.vocab)
            for mode in ("mckp", "reduced", "full"):
                r = subprocess.run([sys.executable, __file__, "--solve", mode, "--tables", path], capture_output=True,
                                   text=True)
                if r.returncode:
                    print(f"| {n} | {7 * n} | | {mode} | failed: {r.stderr.strip().splitlines()[-1]} | | | |",
                          flush=True)
                    continue
                x = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"| {n} | {7 * n} | {x['pairs']} | {mode} | {x['milp_pairs']} | {x['seconds']:.2f} | "
                      f"{x['rss_growth_mb']:.0f} | {x['objective']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
