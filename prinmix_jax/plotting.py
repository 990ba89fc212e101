"""Plots and atomic file writes shared by ``prinmix inspect --plot`` and ``prinmix demo``.

Figures are drawn with matplotlib's Agg backend (no display needed) and written atomically: to
``PATH.tmp.png`` first, then renamed, so an interrupted or failed write never leaves a half-written PNG.
"""
from __future__ import annotations

import os

__all__ = ["plot_bit_allocation", "pyplot", "save_png", "write_text_atomic"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str, dpi: int = 90) -> None:
    """Writes ``fig`` to ``path`` atomically and closes it. Raises ``OSError("PATH: cannot write it (...)")``
    and leaves no temporary file behind when the write fails."""
    plt = pyplot()
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"{path}: cannot write it ({e.strerror or e})") from e
    finally:
        plt.close(fig)


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through ``PATH.tmp`` and a rename."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----- bit allocation of a delta checkpoint (prinmix inspect --plot) ------------------------------
def plot_bit_allocation(meta: dict, path: str) -> None:
    """A PNG of a delta's bit allocation per layer and matrix (``meta``: its ``prinmix_delta.json``): the
    number of kept singular vectors of each width, or, for deltas without widths (BitDelta, uniform, an
    all-zero delta), the bits per parameter of every stored matrix."""
    import numpy as np

    plt = pyplot()
    rows = [r for r in meta["matrices"] if r.get("widths") is not None or r["kind"] == "zero"]
    widths = sorted({int(b) for r in rows for b in (r.get("widths") or {})}, reverse=True)
    if not widths:  # no kept singular vector to draw (bitdelta / uniform, or an all-zero delta)
        fig = _plot_bits_per_param(plt, np, meta)
    else:
        fig = _plot_widths(plt, np, meta, rows, widths)
    save_png(fig, path)


def _title(meta: dict, what: str) -> str:
    return f"{what} ({meta['method']}, ratio {meta['config']['ratio']:.4g})"


def _block_axes(plt, rows: list):
    """One row of axes per matrix name, one x position per block ('glob' for embeddings / head)."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    blocks = sorted({-1 if r["block"] is None else r["block"] for r in rows})
    fig, axes = plt.subplots(len(names), 1, figsize=(max(6, 0.35 * len(blocks) + 3), 1.6 * len(names) + 1),
                             sharex=True, squeeze=False)
    x_of = {b: i for i, b in enumerate(blocks)}
    return fig, axes, names, blocks, x_of


def _finish_block_axes(fig, axes, blocks: list, title: str):
    axes[-1, 0].set_xticks(range(len(blocks)), ["glob" if b < 0 else str(b) for b in blocks])
    axes[-1, 0].set_xlabel("block")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_bits_per_param(plt, np, meta: dict):
    """Bits per parameter of every stored matrix per block, or a note when nothing is stored."""
    rows = [r for r in meta["matrices"] if r.get("nbytes")]
    if not rows:
        fig = plt.figure(figsize=(6, 2.5))
        fig.text(0.5, 0.5, "all deltas are zero: nothing is stored, nothing to plot", ha="center", va="center",
                 wrap=True)
        fig.suptitle(_title(meta, "bit allocation"))
        return fig
    fig, axes, names, blocks, x_of = _block_axes(plt, rows)
    for ax, name in zip(axes[:, 0], names):
        h = np.zeros(len(blocks))
        for r in rows:
            if r["name"] == name:
                h[x_of[-1 if r["block"] is None else r["block"]]] = 8 * r["nbytes"] / max(1, np.prod(r["shape"]))
        ax.bar(range(len(blocks)), h)
        ax.set_ylabel(f"{name}\nbits/param", fontsize=8)
    return _finish_block_axes(fig, axes, blocks, _title(meta, "bits per parameter per layer and matrix"))


def _plot_widths(plt, np, meta: dict, rows: list, widths: list):
    """Stacked bars: kept singular vectors of each width, per block and matrix."""
    fig, axes, names, blocks, x_of = _block_axes(plt, rows)
    cmap = plt.get_cmap("viridis")
    colors = {b: cmap(i / max(1, len(widths) - 1)) for i, b in enumerate(widths)}
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
    return _finish_block_axes(fig, axes, blocks, _title(meta, "bit allocation per layer and matrix"))
