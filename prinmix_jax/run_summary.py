"""The metadata of a finished delta (``prinmix_delta.json``): byte counts, ratios and budgets, the base
fingerprint, one row per matrix; and the checks that say when a finished delta is useless."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import jax
import numpy as np

from prinmix_jax.models.llama.params import expected_tensors
from prinmix_jax.storage import FORMAT, FORMAT_VERSION, combine_fingerprint

if TYPE_CHECKING:
    from prinmix_jax.run import RunPlan

__all__ = ["build_summary", "result_problems"]


def _bitdelta_slack(method) -> int:
    # BitDelta's one float32 scale per matrix is not counted against its 1 bit/param
    return 4 if method == "bitdelta" else 0


def result_problems(summary: dict) -> list[str]:
    """Why a finished delta is useless or out of its bounds (an empty list when it is fine).

    The CLI exits with status 3 when this is not empty. Checked: every delta exactly zero (the fine-tuned
    model equals the base: nothing is stored); every nonzero matrix kept nothing (relative output error
    1, the budget was too small); non-finite recorded errors; bytes over the budget.

    Args:
      summary: the metadata :func:`~prinmix_jax.pipeline.compress_model` returns (``prinmix_delta.json``).
    """
    problems = []
    rows = summary.get("matrices", [])
    nonzero = [r for r in rows if r.get("kind") != "zero"]
    if summary["bytes"]["total"] == 0:
        problems.append("every delta is exactly zero: the fine-tuned model equals the base (0 bytes stored)")
    elif nonzero and all(r.get("rank") == 0 or (r.get("rel_output_error") or 0.0) >= 1.0 - 1e-6 for r in nonzero):
        problems.append(f"no matrix keeps any part of its delta (relative output error 1.0 in all {len(nonzero)}): "
                        f"the budget (ratio {summary['config']['ratio']:.4g}) is too small")
    bad = [r for r in nonzero if r.get("rel_output_error") is not None and not np.isfinite(r["rel_output_error"])]
    if bad:
        problems.append(f"{len(bad)} matrices have a non-finite recorded error, e.g. block {bad[0]['block']} "
                        f"{bad[0]['name']}")
    if not summary.get("within_budget", True):
        b = summary["bytes"]
        pooled = summary.get("scope") == "global"    # block linears share one budget
        over = [r for r in rows if r["nbytes"] > r["budget_bytes"] + _bitdelta_slack(r.get("method"))
                and not (pooled and r["block"] is not None)]
        if not over:
            problems.append(f"over budget: the matrices take {b['linears']} bytes for a budget of "
                            f"{b['budget_bytes_linears']}")
        else:
            r = over[0]
            where = "outside the blocks" if r["block"] is None else f"block {r['block']}"
            problems.append(f"over budget: {len(over)} matrices exceed their own budget, e.g. {r['name']} in "
                            f"{where}: {r['nbytes']} bytes for {r['budget_bytes']}")
    return problems


def _tally(store, num_steps: int, cfg, pooled: bool) -> dict:
    """Reads every step's metadata: per-matrix rows, byte totals, budgets, base step digests."""
    t = {"digests": [], "rows": [], "totals": {"linears": 0, "dense": 0, "globals": 0, "blocks": 0},
         "budget_bytes": 0, "within": True, "lin_params": 0}
    for s in range(num_steps):
        meta = store.restore_meta(s)
        t["digests"].append(meta["base_digest"])
        for name, e in meta["linears"].items():
            shape = e["state"]["shape"] if e["kind"] == "matrix" else e["shape"]
            m, n = int(shape[0]), int(shape[1])
            budget = cfg.budget_bits(m, n) // 8
            info = e.get("info", {})
            row = {"step": s, "block": meta["block"], "name": name, "kind": e["kind"], "shape": [m, n],
                   "method": e["state"]["method"] if e["kind"] == "matrix" else None, "nbytes": e["nbytes"],
                   "budget_bytes": budget, "ratio": e["nbytes"] / (2 * m * n)}
            row.update({k: info[k] for k in ("rel_output_error", "rank", "widths", "seconds") if k in info})
            t["rows"].append(row)
            t["totals"]["linears"] += e["nbytes"]
            t["budget_bytes"] += budget
            if s == 0 or not pooled:   # global scope: one budget for all blocks
                t["within"] &= e["nbytes"] <= budget + _bitdelta_slack(row["method"])
            if s > 0:
                t["lin_params"] += m * n
        t["totals"]["dense"] += sum(e["nbytes"] for e in meta["dense"].values())
        t["totals"]["globals" if s == 0 else "blocks"] += meta["nbytes"]
    t["totals"]["total"] = t["totals"]["globals"] + t["totals"]["blocks"]
    return t


def build_summary(store, plan: RunPlan, base_src, ft_src, seconds: float) -> dict:
    """The top-level metadata of a finished run, from every step's metadata in ``store``."""
    mcfg, identity = plan.model_config, plan.identity
    pooled = identity.get("scope") == "global"
    t = _tally(store, plan.num_steps, plan.config, pooled)
    rows, totals, lin_params = t["rows"], t["totals"], t["lin_params"]
    n_params = sum(int(np.prod(shape)) for _, shape in expected_tensors(mcfg).values())
    block_lin_bytes = sum(r["nbytes"] for r in rows if r["step"] > 0)
    within = t["within"] and block_lin_bytes <= sum(r["budget_bytes"] + _bitdelta_slack(r["method"])
                                                    for r in rows if r["step"] > 0)
    hf = json.loads(mcfg.hf_config_json) if mcfg.hf_config_json else mcfg.to_hf_dict()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "method": plan.method, "scope": identity.get("scope", "matrix"), "config": plan.config.to_dict(),
        "policy": plan.policy.to_dict(), "calibration": plan.calibration,
        "model": {"architecture": mcfg.architecture, "model_type": mcfg.model_type, "num_blocks": mcfg.num_layers,
                  "num_params": n_params, "block_linear_params": lin_params, "hf_config": hf},
        "base": {"fingerprint": combine_fingerprint(t["digests"]), "step_digests": t["digests"],
                 "path": base_src.path, "header_digest": identity["base_header"]},
        "finetuned": {"path": ft_src.path, "header_digest": identity["finetuned_header"]},
        "num_steps": plan.num_steps,
        "bytes": dict(totals, budget_bytes_linears=t["budget_bytes"], dense_16bit_delta=2 * n_params),
        "ratio": totals["total"] / (2 * n_params),
        "ratio_block_linears": block_lin_bytes / (2 * lin_params) if lin_params else 0.0,
        "bits_per_param": 8 * totals["total"] / n_params,
        "within_budget": bool(within),
        "budget_scope": "block linears together" if pooled else "each matrix",
        "matrices": rows,
        "run": {"seconds": seconds, "process_count": jax.process_count(), "device_count": jax.device_count(),
                "platform": jax.devices()[0].platform},
    }
