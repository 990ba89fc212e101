"""``prinmix apply``: BASE + DELTA as a Hugging Face checkpoint folder."""
from __future__ import annotations

import sys

import click

from prinmix_jax.cli.group import EXIT_INTERRUPTED, epilog
from prinmix_jax.cli.options import compile_cache_option, parse_size, progress_option
from prinmix_jax.cli.runtime import use_compile_cache

__all__ = ["apply"]


@click.command(epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C); nothing is written, rerun to start again"))
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("delta", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--force", is_flag=True, help="Apply even if BASE's fingerprint differs from the delta's base.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier prinmix output.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="dtype of the written weights [default: the base's].")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=parse_size,
              help="Shard the safetensors above this size (bytes, or e.g. 500MB, 2GiB).")
@progress_option()
@compile_cache_option
def apply(base, delta, out, force, overwrite, dtype, max_shard_size, progress, compile_cache):
    """Write BASE + DELTA as a Hugging Face checkpoint folder OUT (transformers loads it).

    \b
    Example:
      prinmix apply llama-base/ chat-delta/ llama-chat-merged/ --dtype bfloat16

    The base is checked block by block against the fingerprint stored in DELTA; a different base is
    refused unless --force. config.json and tokenizer files come from the fine-tuned model (kept in DELTA).
    """
    use_compile_cache(compile_cache)
    from prinmix_jax.apply import apply_delta_to_checkpoint

    if progress is None:
        progress = sys.stderr.isatty()
    path = apply_delta_to_checkpoint(base, delta, out, force=force, overwrite=overwrite, dtype=dtype,
                                     max_shard_size=max_shard_size, progress=progress)
    click.echo(f"wrote {path}")
