"""``prinmix demo``: the SFT pair's fine-tuning delta, compressed by PrinMix and every baseline, evaluated."""
from __future__ import annotations

import sys

import click

from prinmix_jax.cli.group import EXIT_INTERRUPTED, epilog
from prinmix_jax.cli.options import compile_cache_option, library_choices, parse_ratio, progress_option
from prinmix_jax.cli.runtime import use_compile_cache

__all__ = ["demo"]


def _parse_ratios(ctx, param, value):
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return ()
    return tuple(parse_ratio(ctx, param, x) for x in value.split(",") if x.strip())


@click.command(epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C)"))
@click.option("--out", type=click.Path(file_okay=False), default="prinmix-demo", show_default=True,
              help="Output folder: deltas/, demo_results.json, .md and .png.")
@click.option("--quick", is_flag=True, help="Tiny pair and small evaluation (seconds; for tests and smoke runs).")
@click.option("--ratio", callback=parse_ratio, default="1/16", show_default=True,
              help="Budget of the main table, relative to a 16-bit delta.")
@click.option("--sweep", is_flag=True,
              help="Also the accuracy-vs-budget sweep (--sweep-methods at 1/32, 1/16, 1/8): about 3x the time.")
@click.option("--ratios", callback=_parse_ratios, default=None,
              help="Budgets of the sweep, e.g. '1/64,1/32,1/16' (implies --sweep; 'none': no sweep).")
@click.option("--methods", default=None, help="Comma-separated methods of the main table [default: all].")
@click.option("--sweep-methods", default="prinmix,deltacome,lowrank,bitdelta", show_default=True,
              help="Comma-separated methods of the accuracy-vs-ratio sweep.")
@click.option("--calibration-mode", type=library_choices("prinmix_jax.config", "CALIBRATION_MODES"), default="parallel",
              show_default=True)
@click.option("--scope", type=library_choices("prinmix_jax.config", "SCOPES"), default="global", show_default=True,
              help="PrinMix allocation: one ILP per matrix, or one over every block linear (total budget).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where the SFT pair is cached [default: $PRINMIX_SFT_CACHE or ~/.cache/prinmix-jax/sft].")
@click.option("--rebuild", is_flag=True, help="Retrain the SFT pair even if it is cached.")
@click.option("--num-test", type=click.IntRange(min=1), default=None, help="Task prompts scored [default 300].")
@click.option("--calibration", type=library_choices("prinmix_jax.demo", "CALIBRATION_SOURCES"), default="text",
              show_default=True,
              help="Calibration windows: held-out stdlib text, or task examples (a seed apart from the test "
                   "prompts'). KL and top-1 are scored on held-out stdlib text either way.")
@click.option("--distill", "distill_steps", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="STEPS",
              help="Also distil each prinmix, deltacome and uniform delta for STEPS steps on the calibration "
                   "windows (as `prinmix distill`) and add its '<method> + distill' row (same bytes). 0: off. "
                   "Use with --calibration task.")
@progress_option("Progress bars on stderr [default: when a terminal].")
@compile_cache_option
def demo(out, quick, ratio, sweep, ratios, methods, sweep_methods, calibration_mode, scope, cache_dir, rebuild, num_test,
         calibration, distill_steps, progress, compile_cache):
    """The main job in one command: a real fine-tuning delta, compressed by PrinMix and every baseline.

    \b
    1. builds (or reuses from the cache) a small Llama pretrained on the Python standard library's
       sources and fully fine-tuned to sort letters ("sort: qdmax =>" -> " admqx");
    2. compresses the fine-tuning delta at --ratio with prinmix, deltacome, bitdelta, lowrank, uniform
       (and, with --sweep, --sweep-methods at several budgets);
    3. applies each delta and prints bytes, model-level ratio, task accuracy, relative layer-output error,
       KL to the fine-tuned model and time; writes the table as JSON / Markdown and a PNG plot.
    One line per phase on stdout; under 5 minutes on 2 CPU cores the first time, and about a minute once
    the pair and the compiled programs are cached.

    With --distill, each delta of prinmix, deltacome and uniform is also distilled against the fine-tuned
    model (`prinmix distill`) and scored as its own row; distil on task windows (--calibration task), as
    on generic text it can lower the task accuracy.

    \b
    Example:
      prinmix demo --quick --out demo-out/
      prinmix demo --ratio 1/32 --calibration task --distill 400 --methods prinmix,uniform
    """
    from prinmix_jax.config import METHODS
    from prinmix_jax.demo import DEFAULT_RATIOS, run_demo

    def parse(text, hint):
        ms = tuple(m.strip() for m in text.split(",") if m.strip())
        bad = [m for m in ms if m not in METHODS]
        if bad:
            raise click.BadParameter(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}", param_hint=hint)
        return ms

    ms = parse(methods, "--methods") if methods else None
    sweep_ms = parse(sweep_methods, "--sweep-methods")
    if ratios is None:
        ratios = DEFAULT_RATIOS if sweep else ()
    use_compile_cache(compile_cache)
    if progress is None:
        progress = sys.stderr.isatty()
    run_demo(out, quick=quick, ratio=ratio, ratios=ratios, methods=ms, sweep_methods=sweep_ms, calibration_mode=calibration_mode, scope=scope,
             cache_dir=cache_dir, rebuild=rebuild, num_test=num_test, progress=progress,
             log=lambda s: click.echo(s), calibration=calibration, distill_steps=distill_steps)
