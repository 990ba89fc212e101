"""``prinmix generate``: one-off completions of BASE + DELTA (or BASE alone) from the shell."""
from __future__ import annotations

import json

import click

from prinmix_jax.cli.group import epilog
from prinmix_jax.cli.options import compile_cache_option
from prinmix_jax.cli.runtime import use_compile_cache
from prinmix_jax.cli.serve import bank_options, open_bank

__all__ = ["generate"]


@click.command(epilog=epilog())
@click.argument("base", type=click.Path(file_okay=False))
@click.option("--delta", type=click.Path(file_okay=False), default=None,
              help="The delta of BASE to generate with [default: BASE alone].")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt (repeat for a batch).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy decoding.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt.")
@bank_options
@compile_cache_option
def generate(base, delta, prompts, max_new_tokens, temperature, top_p, seed, as_json, mode, strategy, dtype, force,
             compile_cache):
    """Print the continuation of each --prompt by BASE + DELTA (through the same bank as prinmix serve).

    \b
    Example:
      prinmix generate llama-base/ --delta chat-delta/ --prompt "sort: qdmax =>"
    """
    use_compile_cache(compile_cache)
    from prinmix_jax.serving.server import bank_tokenizer

    deltas = {} if delta is None else {"delta": delta}
    tok = bank_tokenizer(base, list(deltas.values()))
    bank = open_bank(base, deltas, mode, strategy, dtype, force)
    ids = [tok.encode(p) for p in prompts]
    outs = bank.generate(ids, ["delta" if delta else None] * len(ids), max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, eos_id=tok.eos_id, pad_id=tok.pad_id)
    for p, out in zip(prompts, outs):
        text = tok.decode(out)
        click.echo(json.dumps({"prompt": p, "text": text, "tokens": out}) if as_json else text)
