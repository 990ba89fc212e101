"""The ``prinmix`` command line (click).

Other modules add subcommands by decorating with :data:`main`'s ``command()``::

    from prinmix_jax.cli import main

    @main.command()
    def demo(): ...

The modules listed in :data:`PLUGIN_MODULES` are imported (when present) after the built-in commands are
defined, so their subcommands appear in ``prinmix --help``.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import sys
import traceback

import click

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Finished, but the result is degenerate (nothing kept, base == fine-tuned) or over budget.
EXIT_DEGENERATE = 3
PLUGIN_MODULES = ("prinmix_jax.cli_demo", "prinmix_jax.cli_eval")

_EPILOG = """\b
Exit status:
  0    success
  1    error (bad input, wrong base, existing output, unwritable folder, ...);
       one line "error: ..." on stderr, nothing half-written is left behind
  2    usage error (unknown option, missing argument, bad option value)
  3    compress finished but the result is degenerate or over budget (the delta
       is written; the reason is on stderr)
  130  interrupted (Ctrl-C); rerun the same compress command to resume
  141  stdout closed early (e.g. piped into head); output stops quietly
Set PRINMIX_DEBUG=1 to see tracebacks.
"""

#: Exit status of a command whose stdout was closed early (``prinmix inspect DELTA | head -1``): the
#: shell's 128 + SIGPIPE.
EXIT_BROKEN_PIPE = 141


def epilog(*extra_lines: str) -> str:
    """The "Exit status:" block of one command's help: the statuses every command shares (0, 1, 2, 141),
    then ``extra_lines`` (that command's own, e.g. ``"3    ..."``; a line may hold ``\\n``-separated
    continuation lines, indented by 5 spaces to align), then the PRINMIX_DEBUG line."""
    lines = ["0    success",
             '1    error (bad input, missing or unreadable file, ...);\n     one line "error: ..." on stderr',
             "2    usage error (unknown option, missing argument, bad option value)",
             *extra_lines,
             f"{EXIT_BROKEN_PIPE}  stdout closed early (e.g. piped into head); output stops quietly"]
    body = "\n".join("  " + ln for line in lines for ln in line.split("\n"))
    return f"\b\nExit status:\n{body}\nSet PRINMIX_DEBUG=1 to see tracebacks.\n"


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    return " ".join(msg.split())


def _guard_stdout():
    """Keeps stdout for what a command means to print: C libraries write there too (HiGHS prints its banner
    on file descriptor 1), which would break ``--json | python -m json.tool``. While the command runs, fd 1
    points at stderr and ``sys.stdout`` writes to a copy of the real stdout. Returns the undo function (a
    no-op where stdout is not fd 1, e.g. click's test runner)."""
    try:
        if sys.stdout is None or sys.stdout.fileno() != 1:
            return lambda: None
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return lambda: None
    real = sys.stdout
    sys.stdout = open(saved, "w", encoding=real.encoding or "utf-8", errors=real.errors or "strict", buffering=1,
                      closefd=False)

    def restore():
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        sys.stdout = real
        os.dup2(saved, 1)
        os.close(saved)

    return restore


class _Main(click.Group):
    """Turns exceptions into ``error: ...`` and exit status 1 (no traceback unless PRINMIX_DEBUG=1)."""

    def invoke(self, ctx):
        restore = _guard_stdout()
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # The reader of stdout went away (`prinmix inspect DELTA | head -1`): stop quietly. Point stdout at
            # devnull so flushing it at exit cannot fail again (docs.python.org/3/library/signal.html#note-on-sigpipe).
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):  # stdout without a real file descriptor (e.g. captured in tests)
                pass
            ctx.exit(EXIT_BROKEN_PIPE)
        except KeyboardInterrupt:
            click.echo("error: interrupted (rerun the same command to resume a compress run)", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as e:  # user-facing one-liner
            if os.environ.get("PRINMIX_DEBUG"):
                traceback.print_exc()
            known = isinstance(e, (ValueError, OSError, TypeError, KeyError)) or type(e).__module__.startswith(
                "prinmix_jax")
            prefix = "" if known else f"internal error ({type(e).__name__}): "
            click.echo(f"error: {prefix}{_one_line(e)}", err=True)
            ctx.exit(EXIT_ERROR)
        finally:
            restore()


CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:          # a dotted name whose parent package is missing
        return False


def gpu_xla_flags(autotune: bool, environ=os.environ) -> bool:
    """Turns XLA's GPU autotuning off (``--xla_gpu_autotune_level=0`` in ``XLA_FLAGS``) unless ``autotune``,
    unless ``XLA_FLAGS`` already sets a level, and only where a JAX CUDA plugin is installed (other
    backends are left alone). Must run before JAX starts its backend. Returns whether it set the flag.

    Measured on an H100 (README, GPU): compiling PrinMix's programs for a 4096x4096 matrix took 64.7 s
    with autotuning and 7.1 s without, and running them 1.50 s and 1.56 s.
    """
    flags = environ.get("XLA_FLAGS", "")
    if autotune or "xla_gpu_autotune_level" in flags:
        return False
    if not any(_installed(name) for name in CUDA_PLUGINS):
        return False
    environ["XLA_FLAGS"] = f"{flags} --xla_gpu_autotune_level=0".strip()
    return True


@click.group(cls=_Main, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="prinmix-jax", prog_name="prinmix")
def main():
    """PrinMix: store a fine-tuned LLM as its base plus a ~1 bit/param delta.

    \b
    Typical use:
      prinmix compress BASE FINETUNED delta/ --calib calib.jsonl
      prinmix inspect delta/ --plot bits.png
      prinmix apply BASE delta/ merged/        # a Hugging Face checkpoint

    BASE and FINETUNED are Hugging Face checkpoint folders (config.json + *.safetensors) of the same
    architecture (Llama, Mistral, Qwen2, Qwen3).
    """


def _parse_bits(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 0,2,3,4,8, got {value!r}") from None


def _parse_ratio(ctx, param, value):
    """A number or a fraction: 0.0625, 1/16, 1e-2."""
    import math
    from fractions import Fraction

    text = str(value).strip()
    try:
        r = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"expected a number or a fraction like 1/16 or 0.0625, got {value!r}") from None
    if not math.isfinite(r) or r <= 0:
        raise click.BadParameter(f"must be > 0 (1/16 = 1 bit/param), got {value!r}")
    return r


def _parse_group(ctx, param, value):
    if value is None or value.lower() == "none":
        return None if value is not None else 128
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'none', got {value!r}") from None


@main.command(epilog=epilog(
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
@click.option("--ratio", callback=_parse_ratio, default="1/16", show_default=True,
              help="Storage budget of every matrix relative to a 16-bit delta, a number or a fraction "
                   "(1/16 = 1 bit/param, 1/32 = half a bit).")
@click.option("--bits", callback=_parse_bits, default="0,2,3,4,8", show_default=True,
              help="Candidate widths of a singular vector (0 = may be dropped).")
@click.option("--group-size", callback=_parse_group, default="128", show_default=True,
              help="Entries per quantization scale along V rows and U columns ('none' = whole row).")
@click.option("--method", type=click.Choice(["prinmix", "deltacome", "bitdelta", "lowrank", "uniform"]),
              default="prinmix", show_default=True, help="Compression method (the others are baselines).")
@click.option("--calibration-mode", type=click.Choice(["parallel", "sequential"]), default="parallel",
              show_default=True, help="parallel: Hessians from one pass of FINETUNED; sequential: each block "
                                      "sees hidden states from the already-compressed blocks.")
@click.option("--scope", type=click.Choice(["auto", "matrix", "global"]), default="auto", show_default=True,
              help="matrix: one bit-allocation ILP per matrix within its own budget; global (prinmix): one ILP "
                   "over every block linear under their total budget (parallel calibration or --data-free); "
                   "auto: global for prinmix where possible (best on the SFT pair), else matrix.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--num-sequences", type=click.IntRange(min=1), default=None,
              help="Calibration sequences to use [default: every complete window].")
@click.option("--embeddings", type=click.Choice(["compress", "store", "skip"]), default="compress",
              show_default=True, help="Token embedding delta: compress (data-free), store in 16 bits, or skip.")
@click.option("--lm-head", type=click.Choice(["compress", "store", "skip"]), default="compress",
              show_default=True, help="Untied output head delta: same choices.")
@click.option("--norms", type=click.Choice(["store", "skip"]), default="store", show_default=True,
              help="RMSNorm weight deltas.")
@click.option("--biases", type=click.Choice(["store", "skip"]), default="store", show_default=True,
              help="Linear bias deltas.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier prinmix output (never an input "
                                                 "or a folder prinmix did not write).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--distributed", is_flag=True,
              help="Multi-host: call jax.distributed.initialize() (Cloud TPU fills in the rest).")
@click.option("--coordinator", default=None, metavar="HOST:PORT",
              help="Multi-process coordinator address (with --num-processes and --process-id).")
@click.option("--num-processes", type=click.IntRange(min=1), default=None)
@click.option("--process-id", type=click.IntRange(min=0), default=None)
@click.option("--gpu-autotune", is_flag=True,
              help="Let XLA autotune GPU kernels. Off by default (when a CUDA plugin is installed and XLA_FLAGS "
                   "does not set it): on an H100 it made compiling 9x slower (65 s vs 7 s per matrix shape) "
                   "for runs 4% faster.")
@click.pass_context
def compress(ctx, base, finetuned, out, calib, data_free, ratio, bits, group_size, method, calibration_mode, scope, seq_len,
             num_sequences, embeddings, lm_head, norms, biases, overwrite, progress, as_json, distributed,
             coordinator, num_processes, process_id, gpu_autotune):
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
    if coordinator is not None or distributed:
        if coordinator is not None and (num_processes is None or process_id is None):
            raise click.UsageError("--coordinator needs --num-processes and --process-id")
        from prinmix_jax.pipeline import init_distributed

        init_distributed(coordinator, num_processes, process_id)
    from prinmix_jax.config import CompressionConfig
    from prinmix_jax.pipeline import ParamPolicy, compress_model

    cfg = CompressionConfig(ratio=ratio, bits=bits, group_size=group_size)
    pol = ParamPolicy(norms=norms, biases=biases, embeddings=embeddings, lm_head=lm_head)
    if progress is None:
        progress = sys.stderr.isatty()
    summary = compress_model(base, finetuned, out, calib=calib, config=cfg, method=method,
                             calibration_mode=calibration_mode, scope=None if scope == "auto" else scope,
                             policy=pol, seq_len=seq_len,
                             num_sequences=num_sequences, overwrite=overwrite, progress=progress,
                             log=lambda s: click.echo(s, err=True))
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


@main.command(epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C); nothing is written, rerun to start again"))
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("delta", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--force", is_flag=True, help="Apply even if BASE's fingerprint differs from the delta's base.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier prinmix output.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="dtype of the written weights [default: the base's].")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Shard the safetensors above this size.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
def apply(base, delta, out, force, overwrite, dtype, max_shard_size, progress):
    """Write BASE + DELTA as a Hugging Face checkpoint folder OUT (transformers loads it).

    \b
    Example:
      prinmix apply llama-base/ chat-delta/ llama-chat-merged/ --dtype bfloat16

    The base is checked block by block against the fingerprint stored in DELTA; a different base is
    refused unless --force. config.json and tokenizer files come from the fine-tuned model (kept in DELTA).
    """
    from prinmix_jax.apply import apply_delta_to_checkpoint

    if progress is None:
        progress = sys.stderr.isatty()
    path = apply_delta_to_checkpoint(base, delta, out, force=force, overwrite=overwrite, dtype=dtype,
                                     max_shard_size=max_shard_size, progress=progress)
    click.echo(f"wrote {path}")


def _fmt_widths(w):
    if not w:
        return "-"
    return " ".join(f"{b}b×{n}" for b, n in sorted(w.items(), key=lambda x: -int(x[0])))


@main.command(epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C)"))
@click.argument("delta", type=click.Path(file_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of the bit allocation per layer and matrix (its folder must exist).")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON instead of a table.")
@click.option("--verify", is_flag=True, help="Read every array and check byte counts and SHA-256 checksums.")
def inspect(delta, plot, as_json, verify):
    """Show a delta checkpoint: per-matrix widths, bytes, ratio and recorded errors.

    \b
    Columns: block (or 'glob' for embeddings / head), matrix, shape, rank (kept singular
    vectors), widths (bits × count), bytes stored, budget bytes, ratio to a 16-bit delta,
    relative output error ‖(ΔW − ΔŴ)X‖/‖ΔW X‖ measured at compression time.

    \b
    Example:
      prinmix inspect delta/ --verify --plot bits.png
    """
    if plot:
        _check_plot_path(plot)
    from prinmix_jax.storage import load_delta

    d = load_delta(delta)
    if verify:
        d.verify()
    m = d.meta
    if plot:
        _plot(m, plot)
    if as_json:
        click.echo(json.dumps(m, indent=1, sort_keys=True))
        return
    cal = m.get("calibration")
    click.echo(f"delta      {d.path}")
    click.echo(f"model      {m['model']['architecture']}, {m['model']['num_blocks']} blocks, "
               f"{m['model']['num_params']} params")
    click.echo(f"method     {m['method']}  ratio={m['config']['ratio']:.4g} bits={m['config']['bits']} "
               f"group_size={m['config']['group_size']}")
    click.echo("calib      " + ("data-free" if not cal else
                                 f"{cal['mode']}, {cal['num_sequences']}×{cal['seq_len']} tokens from {cal['source']}"))
    click.echo(f"base       fingerprint {m['base']['fingerprint'][:16]}…")
    click.echo("policy     " + ", ".join(f"{k}={v}" for k, v in m["policy"].items()))
    click.echo("")
    hdr = f"{'block':>5} {'matrix':<12} {'shape':>10} {'rank':>5} {'widths':<24} {'bytes':>9} {'budget':>9} " \
          f"{'ratio':>7} {'rel_err':>8}"
    click.echo(hdr)
    click.echo("-" * len(hdr))
    for r in m["matrices"]:
        blk = "glob" if r["block"] is None else str(r["block"])
        err = r.get("rel_output_error")
        click.echo(f"{blk:>5} {r['name']:<12} {'x'.join(map(str, r['shape'])):>10} "
                   f"{'-' if r.get('rank') is None else r['rank']:>5} {_fmt_widths(r.get('widths')):<24} "
                   f"{r['nbytes']:>9} {r['budget_bytes']:>9} {r['ratio']:>7.4f} "
                   f"{'-' if err is None else format(err, '.4f'):>8}")
    b = m["bytes"]
    click.echo("")
    click.echo(f"total      {b['total']} bytes (matrices {b['linears']}, dense {b['dense']}) = "
               f"{m['bits_per_param']:.3f} bits/param; ratio {m['ratio']:.4f} of a 16-bit delta "
               f"({b['dense_16bit_delta']} bytes); block linears {m['ratio_block_linears']:.4f}")
    click.echo(f"budget     matrices within budget: {'yes' if m['within_budget'] else 'NO'} "
               f"({b['linears']} of {b['budget_bytes_linears']} bytes)")
    for p in m.get("problems", []):   # recorded by compress (which exited with status 3)
        click.echo(f"problem    {p}")
    if verify:
        click.echo("verify     ok: every array present, byte counts and checksums match")
    if plot:
        click.echo(f"plot       {os.path.abspath(plot)}")


def _check_plot_path(path: str) -> None:
    """Refuses a --plot path whose folder is missing or not writable, before any work (in the user's words)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--plot {path}: folder {os.path.dirname(path) or '.'!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--plot {path}: folder {os.path.dirname(path) or '.'!r} is not writable")


def _plot_note(plt, meta: dict, note: str):
    fig = plt.figure(figsize=(6, 2.5))
    fig.text(0.5, 0.5, note, ha="center", va="center", wrap=True)
    fig.suptitle(f"bit allocation ({meta['method']}, ratio {meta['config']['ratio']:.4g})")
    return fig


def _plot(meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in meta["matrices"] if r.get("widths") is not None or r["kind"] == "zero"]
    widths = sorted({int(b) for r in rows for b in (r.get("widths") or {})}, reverse=True)
    if not widths:  # no kept singular vector to draw (bitdelta / uniform, or an all-zero delta)
        fig = _plot_bits_per_param(plt, np, meta)
    else:
        fig = _plot_widths(plt, np, meta, rows, widths)
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"--plot {path}: cannot write it ({e.strerror or e})") from e
    finally:
        plt.close(fig)


def _plot_bits_per_param(plt, np, meta: dict):
    """Bits per parameter of every stored matrix per block, or a note when nothing is stored."""
    rows = [r for r in meta["matrices"] if r.get("nbytes")]
    if not rows:
        return _plot_note(plt, meta, "all deltas are zero: nothing is stored, nothing to plot")
    names = list(dict.fromkeys(r["name"] for r in rows))
    blocks = sorted({-1 if r["block"] is None else r["block"] for r in rows})
    x_of = {b: i for i, b in enumerate(blocks)}
    fig, axes = plt.subplots(len(names), 1, figsize=(max(6, 0.35 * len(blocks) + 3), 1.6 * len(names) + 1),
                             sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        h = np.zeros(len(blocks))
        for r in rows:
            if r["name"] == name:
                h[x_of[-1 if r["block"] is None else r["block"]]] = 8 * r["nbytes"] / max(1, np.prod(r["shape"]))
        ax.bar(range(len(blocks)), h)
        ax.set_ylabel(f"{name}\nbits/param", fontsize=8)
    axes[-1, 0].set_xticks(range(len(blocks)), ["glob" if b < 0 else str(b) for b in blocks])
    axes[-1, 0].set_xlabel("block")
    fig.suptitle(f"bits per parameter per layer and matrix ({meta['method']}, ratio {meta['config']['ratio']:.4g})")
    fig.tight_layout()
    return fig


def _plot_widths(plt, np, meta: dict, rows: list, widths: list):
    names = list(dict.fromkeys(r["name"] for r in rows))
    blocks = sorted({-1 if r["block"] is None else r["block"] for r in rows})
    fig, axes = plt.subplots(len(names), 1, figsize=(max(6, 0.35 * len(blocks) + 3), 1.6 * len(names) + 1),
                             sharex=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    colors = {b: cmap(i / max(1, len(widths) - 1)) for i, b in enumerate(widths)}
    x_of = {b: i for i, b in enumerate(blocks)}
    for ax, name in zip(axes[:, 0], names):
        bottom = np.zeros(len(blocks))
        for b in widths:
            h = np.zeros(len(blocks))
            for r in rows:
                if r["name"] == name:
                    h[x_of[-1 if r["block"] is None else r["block"]]] = (r.get("widths") or {}).get(str(b), 0)
            ax.bar(range(len(blocks)), h, bottom=bottom, color=colors[b], label=f"{b} bits")
            bottom += h
        ax.set_ylabel(f"{name}\n#vectors", fontsize=8)
    axes[0, 0].legend(fontsize=7, ncol=len(widths), loc="upper right")
    axes[-1, 0].set_xticks(range(len(blocks)), ["glob" if b < 0 else str(b) for b in blocks])
    axes[-1, 0].set_xlabel("block")
    fig.suptitle(f"bit allocation per layer and matrix ({meta['method']}, ratio {meta['config']['ratio']:.4g})")
    fig.tight_layout()
    return fig


def _load_plugins() -> None:
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_load_plugins()

if __name__ == "__main__":
    # Run the installed module's group: plugins register their commands on prinmix_jax.cli.main, which is
    # a different object from this __main__ copy's.
    from prinmix_jax.cli import main as _main

    _main()
