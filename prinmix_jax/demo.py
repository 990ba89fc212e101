"""``prinmix demo``: a real fine-tuning delta (the SFT pair), compressed by PrinMix and every baseline, applied
and evaluated. Prints one table and writes ``demo_results.json``, ``demo_results.md`` and ``demo_results.png``.

Everything is measured in this run (nothing is read from a cache except the trained pair itself).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Sequence

import numpy as np

from prinmix_jax.config import parse_ratio
from prinmix_jax.plotting import pyplot, save_png
from prinmix_jax.plotting import write_text_atomic as _write_atomic

__all__ = ["run_demo", "format_table", "DEFAULT_RATIOS", "CALIBRATION_SOURCES", "DISTILLED_METHODS", "parse_ratio"]

DEFAULT_RATIOS = (1 / 32, 1 / 16, 1 / 8)
SWEEP_METHODS = ("prinmix", "deltacome", "lowrank", "bitdelta")
#: Calibration data of ``run_demo(calibration=...)``: held-out stdlib text windows, or windows of task examples.
CALIBRATION_SOURCES = ("text", "task")
#: The methods whose deltas hold SVD-quantised matrices, the ones ``distill_delta`` re-fits (``distill_steps``).
DISTILLED_METHODS = ("prinmix", "deltacome", "uniform")
#: Seed offsets (from the pair's seed) of the test prompts and of the task calibration windows: disjoint draws.
TEST_SEED, TASK_CALIB_SEED = 2000, 3000


def _ratio_label(r: float) -> str:
    inv = 1 / r
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{r:.4g}"


def _block_error(summary: dict) -> float:
    errs = [r["rel_output_error"] for r in summary["matrices"]
            if r["block"] is not None and r.get("rel_output_error") is not None]
    return float(np.mean(errs)) if errs else float("nan")


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The demo table (plain text, or a Markdown table)."""
    cols = [("model", "model", "{}"), ("ratio", "budget", "{}"), ("bytes", "bytes", "{}"),
            ("model_ratio", "model ratio", "{:.4f}"), ("bits_per_param", "bits/param", "{:.3f}"),
            ("accuracy", "task acc", "{:.1%}"), ("gain_kept", "gain kept", "{:.0%}"),
            ("layer_error", "layer err", "{:.4f}"), ("kl", "KL to ft", "{:.4f}"), ("top1", "top-1", "{:.1%}"),
            ("seconds", "time s", "{:.1f}")]

    def cell(r, k, fmt):
        v = r.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return fmt.format(v)

    table = [[h for _, h, _ in cols]] + [[cell(r, k, f) for k, _, f in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
        return "\n".join(lines)
    w = [max(len(row[i]) for row in table) for i in range(len(cols))]
    out = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in table]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def _plot(res: dict, path: str) -> None:
    """The demo's PNG: task accuracy of every model at the main ratio, and accuracy against the budget."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    main = [r for r in res["rows"] if r["method"] is not None]
    names = ["base", "fine-tuned"] + [r["model"] for r in main]
    accs = [res["base"]["accuracy"], res["finetuned"]["accuracy"]] + [r["accuracy"] for r in main]
    colors = ["#999999", "#333333"] + [f"C{i}" for i in range(len(main))]
    a1.bar(range(len(names)), accs, color=colors)
    a1.set_xticks(range(len(names)), names, rotation=30, ha="right")
    a1.set_ylabel("exact-match accuracy")
    a1.set_ylim(0, 1)
    a1.set_title(f"sorting task, ratio {res['ratio_label']} ({res['bits_per_param_nominal']:.2g} bit/param)")
    for i, v in enumerate(accs):
        a1.text(i, v + 0.01, f"{v:.0%}", ha="center", fontsize=8)
    sweep = res.get("sweep") or {}
    for i, (m, pts) in enumerate(sweep.items()):
        pts = sorted(pts, key=lambda p: p["ratio"])
        a2.plot([p["ratio"] for p in pts], [p["accuracy"] for p in pts], "o-", label=m)
    a2.axhline(res["finetuned"]["accuracy"], color="#333333", ls="--", lw=1, label="fine-tuned")
    a2.axhline(res["base"]["accuracy"], color="#999999", ls=":", lw=1, label="base")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("budget ratio (of a 16-bit delta)")
    a2.set_ylabel("exact-match accuracy")
    a2.set_ylim(0, 1)
    a2.legend(fontsize=8)
    a2.set_title("accuracy vs budget")
    fig.tight_layout()
    save_png(fig, path)


class _Phases:
    """One progress line per phase of the demo, ``[k/n] what (seconds since the start)``."""

    def __init__(self, n: int, say: Callable[[str], None]):
        self.n, self.k, self.say, self.t0 = n, 0, say, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.k += 1
        self.say(f"[{self.k}/{self.n}] {what} ({time.perf_counter() - self.t0:.0f}s)")


def _data(s, num_test: int, calib_sequences: int, eval_sequences: int, calib_len: int, calibration: str = "text"):
    """The test prompts of the pair's task, the calibration windows and the held-out evaluation windows.

    The evaluation windows (KL, top-1) are held-out stdlib text whatever the calibration: the windows after the
    text calibration's, so rows of either calibration are scored on the same windows. ``calibration="task"``
    calibrates on windows of task examples drawn with another seed than the test prompts'."""
    from prinmix_jax.sft import data as D

    test = D.make_task(num_test, seed=s.seed + TEST_SEED, min_len=s.task_min_len, max_len=s.task_max_len,
                       task=s.task)
    held = D.corpus_ids("heldout", max_bytes=(calib_sequences + eval_sequences) * calib_len)
    windows = D.text_windows(held, calib_len, calib_sequences + eval_sequences)
    calib = windows[:calib_sequences]
    if calibration == "task":
        calib = D.task_windows(s, calib_sequences, calib_len, s.seed + TASK_CALIB_SEED)
    elif calibration != "text":
        raise ValueError(f"unknown calibration {calibration!r}; choose from {', '.join(CALIBRATION_SOURCES)}")
    return test, calib, windows[calib_sequences:]


def _delta_dir(out: str, m: str, r: float) -> str:
    return os.path.join(out, "deltas", f"{m}-{_ratio_label(r).replace('/', 'of')}")


def _has_svd_quantised(dpath: str) -> bool:
    """Whether the delta at ``dpath`` holds an SVD-quantised linear of nonzero rank (what ``distill_delta``
    re-fits); reads the steps' metadata only."""
    from prinmix_jax.storage import STEPS_DIR, StepStore

    store = StepStore(os.path.join(dpath, STEPS_DIR), read_only=True)
    try:
        for s in store.all_steps():
            for e in store.restore_meta(s)["linears"].values():
                st = e.get("state") or {}
                if e["kind"] == "matrix" and st.get("format") == "SVDQuantDelta" and st.get("group_bits"):
                    return True
        return False
    finally:
        store.close()


def _jobs(methods, ratio, ratios, sweep_methods) -> list[tuple[str, float]]:
    jobs = [(m, ratio) for m in methods]
    for r in (ratios or ()):
        if abs(r - ratio) > 1e-12:
            jobs += [(m, r) for m in sweep_methods]
    return jobs


def _compress_and_score(pair, m: str, r: float, out: str, calib_ids, calib_len: int, evaluate, base_p, *, scope,
                        calibration_mode, overrides: dict, extra: dict) -> dict:
    """One method at one ratio: compress the pair's delta, apply it, score the merged model."""
    from prinmix_jax.apply import apply_delta
    from prinmix_jax.config import CompressionConfig
    from prinmix_jax.pipeline import compress_model

    dpath = _delta_dir(out, m, r)
    kw = dict(extra)
    if m == "prinmix":      # the baselines allocate per matrix by construction
        kw["scope"] = scope
    t = time.perf_counter()
    summ = compress_model(pair.base, pair.finetuned, dpath, calib=calib_ids, config=CompressionConfig(ratio=r, **overrides),
                          method=m, calibration_mode=calibration_mode, seq_len=calib_len, overwrite=True,
                          progress=False, **kw)
    secs = time.perf_counter() - t
    acc, tm = evaluate(apply_delta(base_p, dpath))
    return {"method": m, "ratio": r, "scope": summ["scope"], "bytes": summ["bytes"]["total"], "model_ratio": summ["ratio"],
            "bits_per_param": summ["bits_per_param"], "within_budget": summ["within_budget"],
            "ratio_block_linears": summ["ratio_block_linears"], "accuracy": acc,
            "layer_error": _block_error(summ), "kl": tm["kl"], "top1": tm["top1"], "seconds": secs, "delta": dpath}


def _distill_and_score(pair, row: dict, out: str, calib_ids, calib_len: int, evaluate, base_p, *, steps: int,
                       kwargs: dict) -> dict | None:
    """Distils the delta of ``row`` (one :func:`_compress_and_score` result) on the calibration windows into
    ``<its folder>-distilled``, applies and scores it; None when that delta has no SVD-quantised linear."""
    from prinmix_jax.apply import apply_delta
    from prinmix_jax.distill import distill_delta

    src = _delta_dir(out, row["method"], row["ratio"])
    if not _has_svd_quantised(src):
        return None
    t = time.perf_counter()
    d = distill_delta(pair.base, pair.finetuned, src, src + "-distilled", calib=calib_ids, seq_len=calib_len,
                      steps=steps, overwrite=True, **kwargs)
    secs = time.perf_counter() - t
    acc, tm = evaluate(apply_delta(base_p, d["path"]))
    # same layout and bytes as the input delta; its layer errors (recorded at compression) no longer apply
    return dict(row, bytes=d["bytes"], accuracy=acc, layer_error=None, kl=tm["kl"], top1=tm["top1"],
                seconds=row["seconds"] + secs, distilled=True, distill_steps=int(steps), distill_seconds=secs,
                kl_before=d["kl_before"], kl_after=d["kl_after"], distill_kept=d["kept"], delta=d["path"])


def _rows(pair, results: dict, distilled: dict, methods, ratio, base_acc, base_tm, ft_acc) -> list[dict]:
    gain = ft_acc - base_acc
    rows = [{"model": "base", "method": None, "ratio": "-", "accuracy": base_acc, "gain_kept": 0.0,
             "kl": base_tm["kl"], "top1": base_tm["top1"]},
            {"model": "fine-tuned", "method": None, "ratio": "-", "bytes": 2 * int(pair.info["num_params"]),
             "model_ratio": 1.0, "bits_per_param": 16.0, "accuracy": ft_acc, "gain_kept": 1.0 if gain > 0 else None,
             "kl": 0.0, "top1": 1.0}]
    for m in methods:
        for model, e in ((m, results[(m, ratio)]), (f"{m} + distill", distilled.get((m, ratio)))):
            if e is not None:
                kept = (e["accuracy"] - base_acc) / gain if gain > 0 else None
                rows.append(dict(e, model=model, ratio=_ratio_label(ratio), gain_kept=kept))
    return rows


def _write(out: str, res: dict, rows: list[dict], say) -> None:
    sweep = res["sweep"]
    say("")
    say(f"PrinMix demo: {res['pair']['num_params']}-param Llama pretrained on the Python stdlib, fully fine-tuned "
        f"to {res['task']['name']}; delta budget {res['ratio_label']} of 16 bits "
        f"({res['bits_per_param_nominal']:.3g} bit/param), {res['task']['num_test']} test prompts; calibration: "
        f"{res['calibration']['source']}")
    say(format_table(rows))
    if sweep:
        say("")
        say("accuracy vs budget: " + "; ".join(
            f"{m}: " + ", ".join(f"{_ratio_label(p['ratio'])}={p['accuracy']:.1%}" for p in sorted(
                pts, key=lambda p: p["ratio"])) for m, pts in sweep.items()))
    _write_atomic(os.path.join(out, "demo_results.json"), json.dumps(res, indent=1, default=float))
    _write_atomic(os.path.join(out, "demo_results.md"), format_table(rows, markdown=True) + "\n")
    _plot(res, os.path.join(out, "demo_results.png"))
    say(f"wrote {os.path.join(out, 'demo_results.json')}, .md, .png ({res['seconds_total']:.0f}s in all)")


def run_demo(out: str = "prinmix-demo", *, quick: bool = False, ratio: float = 1 / 16,
             ratios: Sequence[float] | None = None, methods: Sequence[str] | None = None,
             sweep_methods: Sequence[str] = SWEEP_METHODS, calibration_mode: str = "parallel", scope: str = "global",
             cache_dir: str | None = None, rebuild: bool = False, settings=None, num_test: int | None = None,
             calib_sequences: int | None = None, calib_len: int = 128, eval_sequences: int | None = None,
             config_overrides: dict | None = None, progress: bool = True,
             log: Callable[[str], None] | None = print, extra_compress_kwargs: dict | None = None,
             calibration: str = "text", distill_steps: int = 0, distill_kwargs: dict | None = None) -> dict:
    """Build (or reuse) the SFT pair, compress its delta with every method, apply, evaluate, report.

    Args:
      out: output folder (deltas under ``out/deltas``; results ``demo_results.{json,md,png}``).
      quick: the tiny pair and small evaluation sets (tests; the pair does not learn the task well).
      ratio: the budget of the main table (1/16 = 1 bit per delta parameter).
      ratios: budgets of the accuracy-vs-ratio sweep of ``sweep_methods`` (e.g. :data:`DEFAULT_RATIOS`);
        None or empty: no sweep (the default: every method at ``ratio`` only).
      methods: methods of the main table (default :data:`prinmix_jax.METHODS`).
      calibration_mode: ``"parallel"`` or ``"sequential"`` (see :func:`prinmix_jax.pipeline.compress_model`).
      scope: PrinMix's allocation scope, ``"matrix"`` (one ILP per matrix) or ``"global"`` (one ILP over every
        block linear under their total budget); the baselines are per matrix by construction.
      cache_dir, rebuild, settings: the SFT pair cache / forced rebuild / :class:`~prinmix_jax.sft.SFTSettings`.
      num_test: task examples scored (default 300, quick 64).
      calib_sequences, calib_len: calibration windows (default 64, quick 16, of 128 tokens).
      eval_sequences: held-out stdlib text windows (disjoint from the text calibration's) for KL / top-1
        (default 32, quick 8); the same whatever ``calibration``.
      calibration: ``"text"``, held-out stdlib text windows, or ``"task"``, windows of ``BOS prompt answer EOS``
        task examples drawn with another seed than the test prompts' (a user calibrating on fine-tuning data;
        :func:`prinmix_jax.sft.data.task_windows`).
      distill_steps: 0, or after each compression of a method with SVD-quantised matrices
        (:data:`DISTILLED_METHODS`) run :func:`prinmix_jax.distill.distill_delta` for this many steps on the
        same calibration windows and score the result too: a row ``"<method> + distill"`` after the method's
        (same bytes; seconds = compress + distill) and, in the sweep, a series ``"<method>+distill"``.
        Distil on task windows: on stdlib text it lowers the task accuracy (docs/benchmarks.md).
      distill_kwargs: more ``distill_delta`` arguments (``lr``, ``batch_size``, ``seed``, ``refit_dense``,
        ``log``, ...).
      config_overrides: extra :class:`~prinmix_jax.CompressionConfig` fields (e.g. ``{"group_size": 64}``).
      extra_compress_kwargs: passed to ``compress_model``.
      log: where the phase lines and the table go (None: silent).

    Returns:
      The results dict that is also written as JSON.
    """
    from prinmix_jax.config import METHODS
    from prinmix_jax.evaluation import byte_tokenizer, exact_match, token_metrics
    from prinmix_jax.models import ModelConfig, load_hf_params
    from prinmix_jax.sft import FULL, QUICK, make_sft_pair
    from prinmix_jax.sft import data as D

    say = log or (lambda s: None)
    t_all = time.perf_counter()
    methods = tuple(methods or METHODS)
    for m in tuple(methods) + tuple(sweep_methods):
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if calibration not in CALIBRATION_SOURCES:
        raise ValueError(f"unknown calibration {calibration!r}; choose from {', '.join(CALIBRATION_SOURCES)}")
    if int(distill_steps) < 0:
        raise ValueError(f"distill_steps must be >= 0, got {distill_steps}")
    distill_steps = int(distill_steps)
    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, "deltas"), exist_ok=True)
    s = settings or (QUICK if quick else FULL)
    num_test = num_test or (64 if quick else 300)
    calib_sequences = calib_sequences or (16 if quick else 64)
    eval_sequences = eval_sequences or (8 if quick else 32)
    jobs = _jobs(methods, ratio, ratios, sweep_methods)
    n_distill = sum(m in DISTILLED_METHODS for m, _ in jobs) if distill_steps else 0
    phase = _Phases(3 + len(jobs) + n_distill, say)

    phase("the SFT pair: a small Llama pretrained on the Python stdlib, then fully fine-tuned (cached after the "
          "first run)")
    t0 = time.perf_counter()
    pair = make_sft_pair(s, cache_dir=cache_dir, progress=progress, log=say, rebuild=rebuild)
    pair_seconds = time.perf_counter() - t0
    cfg = ModelConfig.from_pretrained_dir(pair.finetuned)
    base_p, ft_p = load_hf_params(pair.base), load_hf_params(pair.finetuned)
    tok = byte_tokenizer()
    test, calib_ids, eval_ids = _data(s, num_test, calib_sequences, eval_sequences, calib_len, calibration)
    source = {"text": "held-out stdlib sources",
              "task": f"{D.TASK_TITLES[s.task]} task examples (seed {s.seed + TASK_CALIB_SEED})"}[calibration]

    def evaluate(params):
        return exact_match(params, cfg, test, tok)["accuracy"], token_metrics(ft_p, params, cfg, eval_ids)

    phase(f"scoring the base and the fine-tuned model on {num_test} task prompts")
    base_acc, base_tm = evaluate(base_p)
    ft_acc = exact_match(ft_p, cfg, test, tok)["accuracy"]
    overrides = dict(config_overrides or {})
    results: dict[tuple[str, float], dict] = {}
    distilled: dict[tuple[str, float], dict] = {}
    for m, r in jobs:
        phase(f"{m} at {_ratio_label(r)}: compress, apply, score")
        results[(m, r)] = _compress_and_score(pair, m, r, out, calib_ids, calib_len, evaluate, base_p, scope=scope,
                                              calibration_mode=calibration_mode, overrides=overrides,
                                              extra=dict(extra_compress_kwargs or {}))
        if distill_steps and m in DISTILLED_METHODS:
            phase(f"{m} at {_ratio_label(r)}: distil {distill_steps} steps on the {len(calib_ids)} {calibration} "
                  f"calibration windows, apply, score")
            d = _distill_and_score(pair, results[(m, r)], out, calib_ids, calib_len, evaluate, base_p,
                                   steps=distill_steps, kwargs=dict(distill_kwargs or {}))
            if d is None:
                say("    skipped: the delta holds no SVD-quantised matrix")
            else:
                distilled[(m, r)] = d
                say(f"    KL to the fine-tuned model on the calibration windows {d['kl_before']:.4f} -> "
                    f"{d['kl_after']:.4f}" + ("" if d["distill_kept"] else " (not lower: the input values kept)"))
    phase("writing the results")
    rows = _rows(pair, results, distilled, methods, ratio, base_acc, base_tm, ft_acc)
    sweep = {}
    if ratios:
        for (m, r), e in results.items():
            for name, x in ((m, e), (f"{m}+distill", distilled.get((m, r)))):
                if m in sweep_methods and x is not None:
                    sweep.setdefault(name, []).append({"ratio": r, "accuracy": x["accuracy"], "kl": x["kl"],
                                                      "layer_error": x["layer_error"], "bytes": x["bytes"]})
    res = {"pair": {"root": pair.root, "settings": pair.info["settings"], "num_params": pair.info["num_params"],
                    "pretrain_seconds": pair.info["pretrain_seconds"],
                    "finetune_seconds": pair.info["finetune_seconds"], "seconds_this_run": pair_seconds},
           "task": {"name": D.TASK_TITLES[s.task], "num_test": num_test, "example": test[0]},
           "scope": scope, "calibration": {"mode": calibration_mode, "sequences": calib_sequences,
                                           "seq_len": calib_len, "name": calibration, "source": source,
                                           "eval_source": "held-out stdlib sources"},
           "distill": {"steps": distill_steps, "methods": list(dict.fromkeys(m for m, _ in distilled)),
                       "kwargs": {k: v for k, v in (distill_kwargs or {}).items() if k != "log"}}
           if distill_steps else None,
           "ratio": ratio, "ratio_label": _ratio_label(ratio), "bits_per_param_nominal": 16 * ratio,
           "base": {"accuracy": base_acc, "kl": base_tm["kl"], "top1": base_tm["top1"]},
           "finetuned": {"accuracy": ft_acc}, "rows": rows, "sweep": sweep,
           "config_overrides": overrides, "seconds_total": time.perf_counter() - t_all}
    _write(out, res, rows, say)
    return res
