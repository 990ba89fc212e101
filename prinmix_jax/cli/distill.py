"""``prinmix distill``: re-fit a PrinMix delta's stored values (σ, scales, codes, norm deltas) against the
fine-tuned model."""
from __future__ import annotations

import json

import click

from prinmix_jax.cli.group import EXIT_INTERRUPTED, epilog
from prinmix_jax.cli.options import compile_cache_option
from prinmix_jax.cli.runtime import use_compile_cache

__all__ = ["distill"]


@click.command(epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C); OUT is not written, rerun to start again"))
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("finetuned", type=click.Path(file_okay=False))
@click.argument("delta", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--calib", type=click.Path(dir_okay=False), required=True,
              help="Data of the fine-tuning task: .txt, .jsonl (\"text\" or \"ids\") or .npy token ids.")
@click.option("--steps", type=click.IntRange(min=0), default=400, show_default=True, help="Adam steps.")
@click.option("--lr", type=click.FloatRange(min=0), default=3e-3, show_default=True, help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Windows per step.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per window.")
@click.option("--num-sequences", type=click.IntRange(min=1), default=None,
              help="Windows taken from --calib [default: every complete one].")
@click.option("--seed", type=int, default=0, show_default=True, help="Window-sampling seed.")
@click.option("--refit-dense/--no-refit-dense", default=True, show_default=True,
              help="Also re-fit the stored norm and bias deltas (same bytes).")
@click.option("--refit-codes/--no-refit-codes", default=True, show_default=True,
              help="Also move the codes of the singular vectors within their grids (straight-through "
                   "training; same widths and bytes).")
@click.option("--code-lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="With --refit-codes: grid steps per Adam step of the code offsets.")
@click.option("--force", is_flag=True, help="Run even if BASE's fingerprint differs from the delta's base.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier prinmix output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@compile_cache_option
def distill(base, finetuned, delta, out, calib, steps, lr, batch_size, seq_len, num_sequences, seed, refit_dense,
            refit_codes, code_lr, force, overwrite, as_json, compile_cache):
    """Re-fit the σ, group scales, codes and stored norm/bias deltas of DELTA (a PrinMix, Delta-CoMe or
    uniform delta of FINETUNED against BASE) so that BASE + DELTA matches FINETUNED's next-token
    distributions on --calib; write the result to OUT (same layout, widths and bytes as DELTA).

    \b
    Example:
      prinmix distill llama-base/ llama-chat/ chat-delta/ chat-delta-distilled/ --calib chat-samples.jsonl

    Use data of the skill the fine-tune is for: on generic text it lowers the KL on that text and can lower
    the task accuracy (docs/benchmarks.md). Both models are held in memory whole.
    """
    use_compile_cache(compile_cache)
    from prinmix_jax.distill import distill_delta

    say = None if as_json else (lambda s: click.echo(s, err=True))
    res = distill_delta(base, finetuned, delta, out, calib=calib, seq_len=seq_len, num_sequences=num_sequences,
                        steps=steps, lr=lr, batch_size=batch_size, seed=seed, overwrite=overwrite, force=force,
                        log=say, refit_dense=refit_dense, refit_codes=refit_codes,
                        code_lr=code_lr)
    if as_json:
        click.echo(json.dumps(res))
    else:
        verdict = "kept" if res["kept"] else "not lower: DELTA's values kept"
        click.echo(f"wrote {res['path']}: KL to the fine-tuned model on --calib {res['kl_before']:.4f} -> "
                   f"{res['kl_after']:.4f} ({verdict}), {res['bytes']} bytes, {res['seconds']:.1f} s")
