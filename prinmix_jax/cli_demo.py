"""``prinmix demo`` and ``prinmix eval`` (registered on :data:`prinmix_jax.cli.main`, which imports this module)."""
from __future__ import annotations

import json
import os
import sys

import click

from prinmix_jax.cli import EXIT_INTERRUPTED, epilog, main

__all__ = ["demo", "eval_cmd"]


def _parse_ratios(ctx, param, value):
    from prinmix_jax.demo import parse_ratio

    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(parse_ratio(x) for x in value.split(",") if x.strip())
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _parse_one_ratio(ctx, param, value):
    from prinmix_jax.demo import parse_ratio

    try:
        return parse_ratio(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@main.command(epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C)"))
@click.option("--out", type=click.Path(file_okay=False), default="prinmix-demo", show_default=True,
              help="Output folder: deltas/, demo_results.json, .md and .png.")
@click.option("--quick", is_flag=True, help="Tiny pair and small evaluation (seconds; for tests and smoke runs).")
@click.option("--ratio", callback=_parse_one_ratio, default="1/16", show_default=True,
              help="Budget of the main table, relative to a 16-bit delta.")
@click.option("--ratios", callback=_parse_ratios, default="1/32,1/16,1/8", show_default=True,
              help="Budgets of the accuracy-vs-ratio plot ('none' to skip the sweep).")
@click.option("--methods", default=None, help="Comma-separated methods of the main table [default: all].")
@click.option("--sweep-methods", default="prinmix,deltacome,lowrank,bitdelta", show_default=True,
              help="Comma-separated methods of the accuracy-vs-ratio sweep.")
@click.option("--calibration-mode", type=click.Choice(["parallel", "sequential"]), default="parallel",
              show_default=True)
@click.option("--scope", type=click.Choice(["matrix", "global"]), default="global", show_default=True,
              help="PrinMix allocation: one ILP per matrix, or one over every block linear (total budget).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where the SFT pair is cached [default: $PRINMIX_SFT_CACHE or ~/.cache/prinmix-jax/sft].")
@click.option("--rebuild", is_flag=True, help="Retrain the SFT pair even if it is cached.")
@click.option("--num-test", type=click.IntRange(min=1), default=None, help="Task prompts scored [default 300].")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr [default: when a terminal].")
def demo(out, quick, ratio, ratios, methods, sweep_methods, calibration_mode, scope, cache_dir, rebuild, num_test, progress):
    """The main job in one command: a real fine-tuning delta, compressed by PrinMix and every baseline.

    \b
    1. builds (or reuses from the cache) a small Llama pretrained on the Python standard library's
       sources and fully fine-tuned to sort letters ("sort: qdmax =>" -> " admqx");
    2. compresses the fine-tuning delta at --ratio with prinmix, deltacome, bitdelta, lowrank, uniform;
    3. applies each delta and prints bytes, model-level ratio, task accuracy, relative layer-output error,
       KL to the fine-tuned model and time; writes the table as JSON / Markdown and a PNG plot.

    \b
    Example:
      prinmix demo --quick --out demo-out/
    """
    from prinmix_jax.config import METHODS
    from prinmix_jax.demo import run_demo

    def parse(text, hint):
        ms = tuple(m.strip() for m in text.split(",") if m.strip())
        bad = [m for m in ms if m not in METHODS]
        if bad:
            raise click.BadParameter(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}", param_hint=hint)
        return ms

    ms = parse(methods, "--methods") if methods else None
    sweep = parse(sweep_methods, "--sweep-methods")
    if progress is None:
        progress = sys.stderr.isatty()
    run_demo(out, quick=quick, ratio=ratio, ratios=ratios, methods=ms, sweep_methods=sweep, calibration_mode=calibration_mode, scope=scope,
             cache_dir=cache_dir, rebuild=rebuild, num_test=num_test, progress=progress,
             log=lambda s: click.echo(s))


@main.command("eval", epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C)"))
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("finetuned", type=click.Path(file_okay=False))
@click.argument("deltas", nargs=-1, type=click.Path(file_okay=False))
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="Text for KL / top-1 / perplexity: .txt, or .jsonl with \"text\" or \"ids\" (tokenized with "
                   "FINETUNED's tokenizer).")
@click.option("--task", type=click.Path(dir_okay=False), default=None,
              help="Exact-match task: JSONL lines {\"prompt\": ..., \"answer\": ...}; greedy decoding.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens per --text window (at most the model's context, max_position_embeddings).")
@click.option("--num-sequences", type=click.IntRange(min=1), default=None,
              help="Text windows scored [default: all complete windows].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens generated per prompt [default: longest answer + 2].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--no-base", is_flag=True, help="Do not score the base model itself.")
@click.option("--force", is_flag=True, help="Apply deltas even if BASE's fingerprint differs.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_cmd(base, finetuned, deltas, text, task, seq_len, num_sequences, max_new_tokens, batch_size, no_base,
             force, as_json):
    """Score BASE + each DELTA (and BASE itself) against FINETUNED.

    \b
    KL        mean per-token KL(finetuned ‖ model) in nats on --text (0 for FINETUNED itself)
    top-1     fraction of positions where the model's argmax equals the fine-tuned model's
    ppl       perplexity on --text
    exact     exact-match accuracy on --task (answers compared after stripping whitespace)

    \b
    Text and prompts are tokenized with FINETUNED's own tokenizer (tokenizer.json etc. in its folder).

    \b
    Example:
      prinmix eval BASE FINETUNED delta/ --text heldout.txt --task task.jsonl
    """
    if text is None and task is None:
        raise click.UsageError("pass --text FILE and/or --task FILE.jsonl")
    from prinmix_jax.evaluation import exact_match, load_prompt_tokenizer, perplexity, token_metrics
    from prinmix_jax.models import ModelConfig, load_hf_params
    from prinmix_jax.models.calibration import check_context, tokenize_calibration
    from prinmix_jax.sft.data import read_task_jsonl

    cfg = ModelConfig.from_pretrained_dir(finetuned)
    bcfg = ModelConfig.from_pretrained_dir(base)
    if bcfg != cfg:
        raise ValueError("BASE and FINETUNED have different model configs (architecture or shapes)")
    # Every input is checked (and tokenized) before any weights are loaded.
    if text is not None:
        check_context(seq_len, cfg, "--seq-len")
    tok = None if task is None else load_prompt_tokenizer(
        finetuned, f"encode the --task prompts of {task}", "eval uses FINETUNED's tokenizer: save it there")
    examples = None if task is None else read_task_jsonl(task)
    ids = None if text is None else tokenize_calibration(text, finetuned, seq_len=seq_len,
                                                         num_sequences=num_sequences, model_config=cfg)
    ft_p = load_hf_params(finetuned)
    base_p = load_hf_params(base)

    def score(name, params):
        r = {"model": name}
        if ids is not None:
            r.update({k: v for k, v in token_metrics(ft_p, params, cfg, ids, batch_size=batch_size).items()})
            r["ppl"] = perplexity(params, cfg, ids, batch_size=batch_size)
        if examples is not None:
            em = exact_match(params, cfg, examples, tok, max_new_tokens=max_new_tokens, batch_size=batch_size)
            r.update(exact=em["accuracy"], correct=em["correct"], total=em["total"])
        return r

    rows = [score("finetuned", ft_p)]
    if not no_base:
        rows.append(score("base", base_p))
    if deltas:
        from prinmix_jax.apply import apply_delta
        from prinmix_jax.storage import load_delta

        for d in deltas:
            dl = load_delta(d)
            r = score(os.path.basename(os.path.normpath(d)), apply_delta(base_p, dl, force=force))
            r.update(delta=os.path.abspath(d), method=dl.meta.get("method"),
                     ratio=dl.meta.get("ratio"), bytes=dl.meta.get("bytes", {}).get("total"))
            rows.append(r)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    hdr = f"{'model':<24} {'KL':>9} {'top-1':>7} {'ppl':>9} {'exact':>7}"
    click.echo(hdr)
    click.echo("-" * len(hdr))
    for r in rows:
        f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)  # noqa: E731
        click.echo(f"{r['model'][:24]:<24} {f('kl', '.5f'):>9} {f('top1', '.1%'):>7} {f('ppl', '.3f'):>9} "
                   f"{f('exact', '.1%'):>7}")
