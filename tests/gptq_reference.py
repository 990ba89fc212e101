"""A straightforward float64 NumPy transcription of GPTQ (the test oracle).

No lazy batching: after each column the whole remaining matrix is updated,
``W[:, j+1:] -= err ⊗ Hinv_up[j, j+1:]``, which is what blocked GPTQ computes in exact
arithmetic. Conventions follow method.md §5.
"""
import numpy as np


def _params(xmin, xmax, maxq):
    xmin = np.minimum(xmin, 0.0)
    xmax = np.maximum(xmax, 0.0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = np.where(empty, -1.0, xmin)
    xmax = np.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.clip(np.round(-xmin / scale), 0, maxq)
    return scale, zero


def _quant(x, scale, zero, maxq):
    q = np.clip(np.round(x / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def gptq_reference(W, H, bits, group_size=None, act_order=False, damp=0.01, scale_axis="row"):
    """Returns (dequantised W, codes) in the original column order."""
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    H = (H + H.T) / 2
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    maxq = 2.0 ** np.asarray(bits, dtype=np.float64) - 1
    axis_len = cols if scale_axis == "row" else rows
    g = axis_len if (not group_size or group_size >= axis_len) else group_size
    static = scale_axis == "row" and (act_order or g == cols)
    if static:  # per-row params for each group of original columns
        colscale = np.zeros_like(W)
        colzero = np.zeros_like(W)
        for c0 in range(0, cols, g):
            blk = W[:, c0:c0 + g]
            s, z = _params(blk.min(1), blk.max(1), maxq)
            colscale[:, c0:c0 + g] = s[:, None]
            colzero[:, c0:c0 + g] = z[:, None]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]
    if static:
        colscale, colzero = colscale[:, perm], colzero[:, perm]
    if scale_axis == "col":
        maxq = maxq[perm]
    H = H + damp * np.mean(np.diag(H)) * np.eye(cols)
    R = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    C = np.zeros_like(W)
    for j in range(cols):
        x = W[:, j].copy()
        if scale_axis == "row":
            if static:
                s, z = colscale[:, j], colzero[:, j]
            else:
                if j % g == 0:
                    blk = W[:, j:j + g]
                    s_cur, z_cur = _params(blk.min(1), blk.max(1), maxq)
                s, z = s_cur, z_cur
            q, dq = _quant(x, s, z, maxq)
        else:
            s = np.zeros(rows)
            z = np.zeros(rows)
            for r0 in range(0, rows, g):
                seg = x[r0:r0 + g]
                s[r0:r0 + g], z[r0:r0 + g] = _params(seg.min(), seg.max(), maxq[j])
            q, dq = _quant(x, s, z, maxq[j])
        Q[:, j] = dq
        C[:, j] = q
        err = (x - dq) / R[j, j]
        W[:, j:] -= np.outer(err, R[j, j:])
    inv = np.argsort(perm)
    return Q[:, inv], C[:, inv]
