"""``prinmix serve``: BASE and many deltas of it behind an OpenAI-style HTTP API (/v1/completions, /v1/models)."""
from __future__ import annotations

import os
import sys

import click

from prinmix_jax.cli.group import epilog
from prinmix_jax.cli.options import compile_cache_option
from prinmix_jax.cli.runtime import use_compile_cache

__all__ = ["serve", "bank_options", "open_bank"]


def bank_options(f):
    """The options that decide how deltas are held and grouped (shared with ``prinmix generate``)."""
    f = click.option("--force", is_flag=True, help="Serve deltas even if BASE's fingerprint differs.")(f)
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
                     help="dtype of the base weights on the device [default: as stored].")(f)
    f = click.option("--strategy", type=click.Choice(["auto", "row", "slot"]), default="auto", show_default=True,
                     help="row: each row's factors gathered once per batch; slot: every slot's product, masked "
                          "per row; auto: row for batches up to twice the deltas, else slot.")(f)
    f = click.option("--mode", type=click.Choice(["packed", "factors"]), default="packed", show_default=True,
                     help="packed: deltas stay in their stored codes, dequantised once per batch in the jitted call; "
                          "factors: dequantised low-rank factors in bfloat16 (more memory).")(f)
    return f


def open_bank(base, deltas: dict, mode, strategy, dtype, force, extra_slots: int = 0):
    """The :class:`~prinmix_jax.serving.DeltaBank` of the CLI options."""
    import jax.numpy as jnp

    from prinmix_jax.serving import DeltaBank

    return DeltaBank.from_deltas(base, deltas, max_deltas=len(deltas) + extra_slots, mode=mode, strategy=strategy,
                                 dtype=None if dtype is None else jnp.dtype(dtype), force=force)


def _parse_deltas(ctx, param, values):
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            path, name = v, os.path.basename(os.path.normpath(v))
        if not name or not path:
            raise click.BadParameter(f"expected NAME=DIR or DIR, got {v!r}")
        if name in out:
            raise click.BadParameter(f"two deltas are named {name!r}")
        out[name] = path
    return out


@click.command(epilog=epilog())
@click.argument("base", type=click.Path(file_okay=False))
@click.option("--delta", "deltas", multiple=True, callback=_parse_deltas, metavar="NAME=DIR",
              help="A delta of BASE to serve as model NAME (repeat; DIR alone: named after its folder).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@click.option("--base-name", default=None, help="The base's model name [default: BASE's folder name].")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most requests answered by one mixed batch.")
@click.option("--batch-window-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="How long the first waiting request waits for others to join its batch.")
@bank_options
@compile_cache_option
def serve(base, deltas, host, port, base_name, max_batch, batch_window_ms, mode, strategy, dtype, force,
          compile_cache):
    """Serve BASE and each --delta NAME=DIR over HTTP (OpenAI-style /v1/completions and /v1/models).

    \b
    The request's "model" picks the fine-tune by NAME (the base under --base-name). Requests that arrive
    together are answered in one batch mixing fine-tunes. Stop with Ctrl-C or SIGTERM.

    \b
    Example:
      prinmix serve llama-base/ --delta chat=chat-delta/ --delta code=code-delta/ --port 8000
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "chat", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'
    """
    use_compile_cache(compile_cache)
    from prinmix_jax.serving.server import bank_tokenizer, make_app
    from prinmix_jax.serving.server import serve as run

    base_name = base_name or os.path.basename(os.path.normpath(base))
    if base_name in deltas:
        raise click.UsageError(f"a delta is named {base_name!r} like the base; pass --base-name")
    tokenizer = bank_tokenizer(base, list(deltas.values()))
    bank = open_bank(base, deltas, mode, strategy, dtype, force)
    mem = bank.memory()
    print(f"device memory: base {mem['base'] / 1e6:.1f} MB, {len(bank.names)} delta(s) {mem['slots'] / 1e6:.1f} MB; "
          f"each batch adds {mem['prepared'] / 1e6:.1f} MB of float32 factors while it runs", file=sys.stderr)
    app = make_app(bank, tokenizer, base_name, max_batch=max_batch, batch_window=batch_window_ms / 1000)
    names = ", ".join([base_name, *bank.names])
    run(app, host, port, announce=lambda url: print(f"serving {names} on {url}", file=sys.stderr, flush=True))
