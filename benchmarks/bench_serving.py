"""Serving many fine-tunes of one base (prinmix_jax.serving): device memory, generation throughput, compile
time and task accuracy through the delta bank, on the SFT family (one pretrained base fully fine-tuned on
several tasks, ``make_sft_family``).

    python benchmarks/bench_serving.py [--full] [--tasks sort,reverse,sortdesc] [--rows 8,32] [--new 64]
                                       [--cache-dir DIR]
    python benchmarks/bench_serving.py --base BASE --delta NAME=DIR --delta NAME=DIR ...   # any deltas

Prints a Markdown report (the "Serving" section of docs/benchmarks.md). Not a test. Timings are the
fastest of ``--reps`` interleaved rounds (the machine may be shared); "per step" and "fixed" split a call's time into
decode steps and what runs once per call (dequantising / gathering the deltas, prefill), from calls with
8 and ``--new`` new tokens.
"""
from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import time

import jax


def _family(settings, tasks, cache_dir):
    from prinmix_jax import sft

    fam = sft.make_sft_family(settings, tasks, cache_dir=cache_dir, progress=False)
    return fam.base, dict(fam.finetuned)


def _compress(base, fts, root):
    from prinmix_jax import CompressionConfig, compress_model

    out = {}
    for task, ft in fts.items():
        out[task] = os.path.join(root, f"delta-{task}")
        t = time.perf_counter()
        compress_model(base, ft, out[task], config=CompressionConfig(ratio=1 / 16), method="prinmix")
        print(f"<!-- compressed {task} in {time.perf_counter() - t:.1f} s -->", flush=True)
    return out


def _measure(fns: dict, new: int, reps: int) -> dict:
    """``{name: (first call s, call s at new tokens, ms per decode step, ms once per call)}`` of ``fns``
    (``{name: f(k)}``, k new tokens). Calls run in interleaved rounds and each figure is the fastest round,
    so load from other jobs on a shared machine hits every setting alike."""
    first, t_new, t8 = {}, {}, {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn(new)
        first[name] = time.perf_counter() - t
        fn(8)
    for _ in range(reps):
        for name, fn in fns.items():
            for k, store in ((new, t_new), (8, t8)):
                t = time.perf_counter()
                fn(k)
                store.setdefault(name, []).append(time.perf_counter() - t)
    out = {}
    for name in fns:
        tn, t_8 = min(t_new[name]), min(t8[name])
        step = (tn - t_8) / (new - 8)
        out[name] = (first[name], tn, 1e3 * step, 1e3 * (t_8 - 8 * step))
    return out


def _accuracy(bank, base_p, cfg, deltas, n, settings):
    """Exact match per task: base, merged model, and the bank with every task's prompts interleaved in mixed
    batches of 64 rows (each row through its task's delta)."""
    from prinmix_jax.apply import apply_delta
    from prinmix_jax.evaluation import byte_tokenizer, exact_match
    from prinmix_jax.sft import make_task

    tok = byte_tokenizer()
    ex = {t: make_task(n, seed=99, min_len=settings.task_min_len, max_len=settings.task_max_len, task=t)
          for t in deltas}
    order = [(t, i) for i in range(n) for t in deltas]          # interleaved: every batch mixes the tasks
    k = max(len(tok.encode(e["answer"])) for es in ex.values() for e in es) + 2
    preds = {}
    for s in range(0, len(order), 64):
        chunk = order[s:s + 64]
        gens = bank.generate([tok.encode(ex[t][i]["prompt"]) for t, i in chunk], [t for t, _ in chunk], k,
                             eos_id=tok.eos_id, pad_id=tok.pad_id)
        preds.update({ti: tok.decode(g) for ti, g in zip(chunk, gens)})
    rows = []
    for t in deltas:
        merged = exact_match(apply_delta(base_p, deltas[t]), cfg, ex[t], tok, max_new_tokens=k)
        base_acc = exact_match(base_p, cfg, ex[t], tok, max_new_tokens=k)["accuracy"]
        mine = [preds[(t, i)] for i in range(n)]
        acc = sum(p.strip() == e["answer"].strip() for p, e in zip(mine, ex[t])) / n
        same = sum(p == q for p, q in zip(mine, merged["predictions"]))
        rows.append((t, base_acc, merged["accuracy"], acc, same, n))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the demo's FULL settings (default: QUICK)")
    ap.add_argument("--tasks", default=None, help="comma-separated SFT tasks [default: make_sft_family's]")
    ap.add_argument("--cache-dir", default=None, help="SFT cache folder [default: ~/.cache/prinmix-jax/sft]")
    ap.add_argument("--rows", default="8,32", help="batch sizes (comma-separated)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row (> 8)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--base", default=None, help="a base checkpoint folder instead of the SFT family ...")
    ap.add_argument("--delta", action="append", default=[], metavar="NAME=DIR",
                    help="... and its compressed deltas (repeat; no accuracy table)")
    ap.add_argument("--only-memory", action="store_true", help="stop after the memory table")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the task accuracy table")
    ap.add_argument("--no-throughput", action="store_true", help="skip the generation tables")
    args = ap.parse_args()
    from prinmix_jax.evaluation import greedy_generate
    from prinmix_jax.models import ModelConfig, load_hf_params
    from prinmix_jax.serving import DeltaBank
    from prinmix_jax.sft import FULL, QUICK, make_sft_family

    settings = FULL if args.full else QUICK
    if args.base:
        base, deltas = args.base, dict(d.split("=", 1) for d in args.delta)
        args.no_accuracy = True
    else:
        tasks = (tuple(args.tasks.split(",")) if args.tasks
                 else inspect.signature(make_sft_family).parameters["tasks"].default)
        base, fts = _family(settings, tasks, args.cache_dir)
        deltas = _compress(base, fts, tempfile.mkdtemp(prefix="bench-serving-"))
    cfg = ModelConfig.from_pretrained_dir(base)
    base_p = load_hf_params(base)
    print(f"\nbackend {jax.default_backend()}, {os.cpu_count()} CPU cores; model: {cfg.num_layers} blocks, hidden "
          f"{cfg.hidden_size}, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}; fine-tunes "
          f"{', '.join(deltas)} (prinmix, ratio 1/16)\n")

    # ----- memory ------------------------------------------------------------------------------------
    from prinmix_jax.storage import load_delta

    print("| N deltas | base MB | deltas as stored MB | bank packed MB (rank multiple 1 / 8) | bank bf16 factors MB "
          "| N/16 of the base MB | N merged models MB | float32 factors per call MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = list(deltas)
    for n in (1, 4, 8):
        use = {f"{names[i % len(names)]}{i}": deltas[names[i % len(names)]] for i in range(n)}
        stored = sum(load_delta(p).meta["bytes"]["total"] for p in use.values())
        mems = {(m, mult): DeltaBank.from_deltas(base, use, mode=m, rank_multiple=mult).memory()
                for m, mult in (("packed", 1), ("packed", 8), ("factors", 1))}
        slot_mb = {k: (mem["slots"] - mem["per_slot"]) / 1e6 for k, mem in mems.items()}
        base_mb = mems["packed", 1]["base"] / 1e6
        print(f"| {n} | {base_mb:.3f} | {stored / 1e6:.3f} | {slot_mb['packed', 1]:.3f} / {slot_mb['packed', 8]:.3f} "
              f"| {slot_mb['factors', 1]:.3f} | {n * base_mb / 16:.3f} | {n * base_mb:.3f} "
              f"| {mems['packed', 1]['prepared'] / 1e6:.3f} |")
    if args.only_memory:
        return

    # ----- throughput --------------------------------------------------------------------------------
    from prinmix_jax.sft import encode

    words = ("qdmax", "lpeba", "zyxw", "hello", "abcde", "mnop", "trees", "jump")
    settings_list = [("packed", "auto"), ("packed", "row"), ("packed", "slot"), ("factors", "auto")]
    banks = {ms: DeltaBank.from_deltas(base, deltas, mode=ms[0], strategy=ms[1]) for ms in settings_list}
    for rows in [] if args.no_throughput else map(int, args.rows.split(",")):
        prompts = [encode(f"sort: {words[i % len(words)]} =>", bos=True) for i in range(rows)]
        models = [names[i % len(names)] for i in range(rows)]
        from prinmix_jax.serving.forward import resolve_strategy

        auto = resolve_strategy("auto", rows, len(names) + 1)
        print(f"\n{rows} rows x {args.new} new tokens (greedy, KV cache), rows cycling through {len(names)} "
              f"fine-tunes; auto = {auto} here; first call includes compilation\n")
        print("| setting | first call s | tokens/s | vs base alone | ms per decode step | ms once per call |")
        print("|---|---:|---:|---:|---:|---:|")
        fns = {"base alone (no bank)": lambda k, p=prompts: greedy_generate(base_p, cfg, p, k)}
        for (mode, strategy), bank in banks.items():
            fns[f"bank {mode}/{strategy}, mixed rows"] = (
                lambda k, bank=bank, p=prompts, m=models: bank.generate(p, m, k))
        fns["bank packed/auto, every row the base"] = (
            lambda k, p=prompts: banks["packed", "auto"].generate(p, [None] * len(p), k))
        res = _measure(fns, args.new, args.reps)
        t_base = res["base alone (no bank)"][1]
        for name, (first, t, step, fixed) in res.items():
            print(f"| {name} | {first:.2f} | {rows * args.new / t:.0f} | {t_base / t:.2f}x | {step:.2f} | "
                  f"{fixed:.1f} |")
    if args.no_accuracy:
        return

    # ----- task accuracy -----------------------------------------------------------------------------
    print(f"\nexact match on {args.examples} held-out prompts per task (greedy)\n")
    print("| task | base | merged (apply_delta) | bank (packed) | same answers |")
    print("|---|---:|---:|---:|---:|")
    for task, b, m, k, same, n in _accuracy(banks["packed", "auto"], base_p, cfg, deltas, args.examples, settings):
        print(f"| {task} | {b:.1%} | {m:.1%} | {k:.1%} | {same}/{n} |")


if __name__ == "__main__":
    main()
