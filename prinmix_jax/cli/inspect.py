"""``prinmix inspect``: a delta checkpoint's widths, bytes, ratio and errors, as a table, JSON or a plot."""
from __future__ import annotations

import json
import os

import click

from prinmix_jax.cli.group import EXIT_INTERRUPTED, epilog

__all__ = ["inspect"]


def _fmt_widths(w):
    if not w:
        return "-"
    return " ".join(f"{b}b×{n}" for b, n in sorted(w.items(), key=lambda x: -int(x[0])))


@click.command(epilog=epilog(f"{EXIT_INTERRUPTED}  interrupted (Ctrl-C)"))
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
    relative output error ‖(ΔW − ΔŴ)X‖/‖ΔW X‖ measured at compression time (before any
    `prinmix distill`, whose KL is shown on its own line).

    \b
    Example:
      prinmix inspect delta/ --verify --plot bits.png
    """
    if plot:
        _check_plot_path(plot)
    from prinmix_jax.plotting import plot_bit_allocation
    from prinmix_jax.storage import load_delta

    d = load_delta(delta)
    if verify:
        d.verify()
    m = d.meta
    if plot:
        try:
            plot_bit_allocation(m, plot)
        except OSError as e:
            raise OSError(f"--plot {e}") from e
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
    dist = m.get("distillation")
    if dist:   # prinmix distill re-fitted the values; the rel_err column is still the compression's
        click.echo(f"distilled  {dist['steps']} steps on {dist['windows']}×{dist['seq_len']} tokens from "
                   f"{dist['source']}: KL {dist['kl_before']:.4g} → {dist['kl_after']:.4g}"
                   f"{'' if dist['kept'] else ' (not lower: values kept)'}; rel_err below is from before it")
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
    # BitDelta's one float32 scale per matrix is not counted against its budget (run_summary._bitdelta_slack)
    slack = ", plus BitDelta's uncounted 4-byte scale per matrix" if m["method"] == "bitdelta" else ""
    click.echo(f"budget     matrices within budget: {'yes' if m['within_budget'] else 'NO'} "
               f"({b['linears']} of {b['budget_bytes_linears']} bytes{slack})")
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
