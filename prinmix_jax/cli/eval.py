"""``prinmix eval``: BASE + each DELTA (and BASE itself) scored against FINETUNED."""
from __future__ import annotations

import json
import os

import click

from prinmix_jax.cli.group import EXIT_INTERRUPTED, epilog
from prinmix_jax.cli.options import compile_cache_option
from prinmix_jax.cli.runtime import use_compile_cache

__all__ = ["eval_cmd"]


@click.command("eval", epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C)"))
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
@compile_cache_option
def eval_cmd(base, finetuned, deltas, text, task, seq_len, num_sequences, max_new_tokens, batch_size, no_base,
             force, as_json, compile_cache):
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
    for opt, path in (("--text", text), ("--task", task)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{opt} {path}: no such file")
    use_compile_cache(compile_cache)
    from prinmix_jax.evaluation import (
        exact_match,
        load_prompt_tokenizer,
        perplexity,
        token_metrics,
    )
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
    if ids is not None and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"--text {text}: token ids span [{ids.min()}, {ids.max()}] but the model's vocabulary has "
                         f"{cfg.vocab_size} entries (ids made with another tokenizer?)")
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
    def cell(r, k, spec):
        return "-" if r.get(k) is None else format(r[k], spec)

    for r in rows:
        click.echo(f"{r['model'][:24]:<24} {cell(r, 'kl', '.5f'):>9} {cell(r, 'top1', '.1%'):>7} "
                   f"{cell(r, 'ppl', '.3f'):>9} {cell(r, 'exact', '.1%'):>7}")
