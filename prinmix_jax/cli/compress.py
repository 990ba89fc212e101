"""``prinmix compress``: FINETUNED − BASE into a delta checkpoint folder."""
from __future__ import annotations

import json
import os
import sys

import click

from prinmix_jax.cli.group import EXIT_DEGENERATE, EXIT_INTERRUPTED, epilog
from prinmix_jax.cli.options import (LibraryChoice, compile_cache_option, library_choices, parse_bits, parse_group,
                                     parse_ratio, progress_option)
from prinmix_jax.cli.runtime import gpu_xla_flags, use_compile_cache

__all__ = ["compress"]


def _config():
    import prinmix_jax.config

    return prinmix_jax.config


def _policy(field: str) -> LibraryChoice:
    """The choices of one :class:`~prinmix_jax.policy.ParamPolicy` field."""
    return library_choices("prinmix_jax.policy", "POLICY_CHOICES", field)


@click.command(epilog=epilog(
    f"{EXIT_DEGENERATE}    finished, but the result is useless or over budget: the fine-tuned model\n"
    "     equals the base, nothing of the delta is kept, or bytes exceed the budget\n"
    "     (the delta is written; the reason is on stderr)",
    f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C); rerun the same command to resume"))
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("finetuned", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration data: plain text, JSONL with a \"text\" field (tokenized with FINETUNED's own "
                   "tokenizer) or JSONL with pre-tokenized \"ids\" lists. Required unless --data-free.")
@click.option("--data-free", is_flag=True, help="No calibration data: identity Hessians (weight-space error).")
@click.option("--ratio", callback=parse_ratio, default="1/16", show_default=True,
              help="Storage budget of every matrix relative to a 16-bit delta, a number or a fraction "
                   "(1/16 = 1 bit/param, 1/32 = half a bit).")
@click.option("--bits", callback=parse_bits, default=None,
              help="Candidate widths of a singular vector (0 = may be dropped; 1 = sign codes). "
                   "[default: 0,2,3,4,8 at --ratio 1/16 and above, 0,1,2,3,4,8 below]")
@click.option("--grid", type=library_choices("prinmix_jax.config", "GRIDS"), default="mse", show_default=True,
              help="Quantization grid: 'mse' (least-squares scales, symmetric 1- and 2-bit grids) or 'minmax' "
                   "(the reference GPTQ's).")
@click.option("--index-metadata", type=library_choices("prinmix_jax.config", "INDEX_METADATA"), default="lean",
              show_default=True,
              help="Per-index metadata: 'lean' (format 3: implied widths, zeros and single-group scales not "
                   "stored) or 'full' (format 2's layout).")
@click.option("--group-size", callback=parse_group, default="128", show_default=True,
              help="Entries per quantization scale along V rows and U columns ('none' = whole row).")
@click.option("--method", type=library_choices("prinmix_jax.config", "METHODS"),
              default="prinmix", show_default=True, help="Compression method (the others are baselines).")
@click.option("--calibration-mode", type=library_choices("prinmix_jax.config", "CALIBRATION_MODES"), default="parallel",
              show_default=True, help="parallel: Hessians from one pass of FINETUNED; sequential: each block "
                                      "sees hidden states from the already-compressed blocks.")
@click.option("--scope", type=LibraryChoice(lambda: ("auto", *_config().SCOPES)), default="auto", show_default=True,
              help="matrix: one bit-allocation ILP per matrix within its own budget; global (prinmix): one ILP "
                   "over every block linear under their total budget (parallel calibration or --data-free); "
                   "auto: global for prinmix where possible (best on the SFT pair), else matrix.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--num-sequences", type=click.IntRange(min=1), default=None,
              help="Calibration sequences to use [default: every complete window].")
@click.option("--embeddings", type=_policy("embeddings"), default="compress",
              show_default=True, help="Token embedding delta: compress (data-free), store in 16 bits, or skip.")
@click.option("--lm-head", type=_policy("lm_head"), default="compress",
              show_default=True, help="Untied output head delta: same choices.")
@click.option("--norms", type=_policy("norms"), default="store", show_default=True,
              help="RMSNorm weight deltas.")
@click.option("--biases", type=_policy("biases"), default="store", show_default=True,
              help="Linear bias deltas.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier prinmix output (never an input "
                                                 "or a folder prinmix did not write).")
@progress_option()
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--distributed", is_flag=True,
              help="Multi-host: call jax.distributed.initialize() (Cloud TPU fills in the rest).")
@click.option("--coordinator", default=None, metavar="HOST:PORT",
              help="Multi-process coordinator address (with --num-processes and --process-id).")
@click.option("--num-processes", type=click.IntRange(min=1), default=None)
@click.option("--process-id", type=click.IntRange(min=0), default=None)
@click.option("--gpu-autotune", is_flag=True,
              help="Let XLA autotune GPU kernels. Off by default (when a CUDA plugin is installed and XLA_FLAGS "
                   "does not set it): it makes compiling much slower for runs barely faster (docs/benchmarks.md).")
@compile_cache_option
@click.pass_context
def compress(ctx, base, finetuned, out, calib, data_free, ratio, bits, grid, index_metadata, group_size, method, calibration_mode, scope, seq_len,
             num_sequences, embeddings, lm_head, norms, biases, overwrite, progress, as_json, distributed,
             coordinator, num_processes, process_id, gpu_autotune, compile_cache):
    """Compress FINETUNED − BASE into a delta checkpoint folder OUT.

    \b
    Example:
      prinmix compress llama-base/ llama-chat/ chat-delta/ --calib calib.jsonl --ratio 1/16

    \b
    A calibration JSONL file holds one object per line, text or token ids:
      {"text": "Question: what is 2+3? Answer: 5"}
      {"ids": [1, 4521, 338, 29871, 29945]}

    Work is streamed block by block into OUT.partial (an Orbax checkpoint manager, one step per finished
    block) and renamed to OUT at the end. If the run is killed, the same command resumes from the last
    finished block; a rerun whose inputs changed (by content) or whose settings differ starts over.
    OUT must not exist unless --overwrite, which replaces only an earlier prinmix output (never an input
    or a folder prinmix did not write).

    \b
    Multi-host (one process per host): pass --distributed on Cloud TPU, or
    --coordinator HOST:PORT --num-processes N --process-id I elsewhere; OUT must be a folder every
    process sees (shared disk or mounted bucket).
    """
    if (calib is None) == (not data_free):
        raise click.UsageError("pass --calib FILE (calibration data) or --data-free" if calib is None
                               else "--calib and --data-free exclude each other")
    if data_free:
        given = [f"--{n.replace('_', '-')}" for n in ("calibration_mode", "seq_len", "num_sequences")
                 if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
        if given:
            raise click.UsageError(f"{', '.join(given)} set(s) how calibration data is used; with --data-free "
                                   "there is none: drop the option or pass --calib FILE")
    if method != "prinmix" and scope == "global":
        raise click.UsageError(f"--scope global allocates PrinMix widths; --method {method} has its own "
                               "allocation (use --scope matrix or auto)")
    if scope == "global" and calibration_mode == "sequential":
        raise click.UsageError("--scope global needs every error table before any block is compressed: use "
                               "--calibration-mode parallel, or --scope matrix")
    gpu_xla_flags(gpu_autotune)
    use_compile_cache(compile_cache)
    if coordinator is not None or distributed:
        if coordinator is not None and (num_processes is None or process_id is None):
            raise click.UsageError("--coordinator needs --num-processes and --process-id")
        from prinmix_jax.pipeline import init_distributed

        init_distributed(coordinator, num_processes, process_id)
    from prinmix_jax.config import CompressionConfig
    from prinmix_jax.pipeline import ParamPolicy, compress_model

    cfg = CompressionConfig(ratio=ratio, bits=bits, group_size=group_size, grid=grid, index_metadata=index_metadata)
    pol = ParamPolicy(norms=norms, biases=biases, embeddings=embeddings, lm_head=lm_head)
    if progress is None:
        progress = sys.stderr.isatty()
    from prinmix_jax.models.errors import CalibrationDataError

    try:
        summary = compress_model(base, finetuned, out, calib=calib, config=cfg, method=method,
                                 calibration_mode=calibration_mode, scope=None if scope == "auto" else scope,
                                 policy=pol, seq_len=seq_len,
                                 num_sequences=num_sequences, overwrite=overwrite, progress=progress,
                                 log=lambda s: click.echo(s, err=True))
    except CalibrationDataError as e:
        raise _in_option_words(e, seq_len) from None
    import jax

    if jax.process_index() != 0:
        return
    if as_json:
        click.echo(json.dumps(summary, indent=1, sort_keys=True))
    else:
        b = summary["bytes"]
        click.echo(f"wrote {os.path.abspath(out)}: {b['total']} bytes = {summary['bits_per_param']:.3f} bits/param, "
                   f"ratio {summary['ratio']:.4f} of a 16-bit delta (block linears {summary['ratio_block_linears']:.4f}); "
                   f"within budget: {'yes' if summary['within_budget'] else 'NO'}")
    problems = summary.get("problems", [])
    for p in problems:
        click.echo(f"result: {p}", err=True)
    if problems:
        ctx.exit(EXIT_DEGENERATE)


def _in_option_words(e: Exception, seq_len: int) -> Exception:
    """The library's calibration checks name its argument (``seq_len=100 is longer than the model's context``,
    ``shorter than one sequence of seq_len=32``); the user set ``--seq-len``."""
    msg = str(e)
    return type(e)(msg.replace(f"seq_len={seq_len}", f"--seq-len={seq_len}")) if f"seq_len={seq_len}" in msg else e
