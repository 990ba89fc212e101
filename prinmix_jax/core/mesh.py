"""The 1-D device mesh of a stack of same-shape matrices, and programs sharded over it: whole
matrices per device, one at a time, never a padding copy (:func:`run_sharded`), or tiles of the rows of a stack
(:func:`run_rows_sharded`; the GPTQ passes of V go through :func:`run_stack_rows`, which picks between the two
by the device count)."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

#: The name of the one mesh axis: matrices of a stack are spread over it.
BATCH_AXIS = "batch"


def default_mesh(mesh: Mesh | None = None, axis: str = BATCH_AXIS) -> Mesh:
    """``mesh``, or a 1-D mesh over this process's devices when it is ``None`` (the inputs are host-local
    arrays; in a multi-process run each process compresses its own share)."""
    return mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), (axis,))


def on_cpu(mesh: Mesh | None = None) -> bool:
    """Whether ``mesh`` (default: :func:`default_mesh`) is made of CPU devices, whose simulated devices share
    the host's cores: several switches keep their multi-device paths for accelerators there."""
    return default_mesh(mesh).devices.flat[0].platform == "cpu"


def single_device_mesh(axis: str = BATCH_AXIS) -> Mesh:
    """A 1-D mesh of the first device."""
    return Mesh(np.asarray(jax.devices()[:1]), (axis,))


@functools.cache
def _compiled(fn, mesh, n_batched, with_scalar, axis):
    """``fn`` over the leading axis of ``n_batched`` arrays sharded over ``mesh``: each device runs ``fn`` on its
    own matrices one at a time (``lax.map`` inside ``shard_map``), so a matrix's bytes come from the same
    unbatched program whatever the device count or batch size (a ``vmap``'s batched products and a
    partitioned program's layouts round differently on XLA:CPU: by ~1e-7, which the byte-identity of resumed
    and re-sharded runs does not allow)."""
    def local(*a):
        xs, rest = a[:n_batched], a[n_batched:]
        return jax.lax.map(lambda t: fn(*t, *rest), xs)

    specs = (P(axis),) * n_batched + (P(),) * with_scalar
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(axis), check_vma=False))


def run_sharded(fn, mesh: Mesh, *args, axis: str = BATCH_AXIS):
    """Runs ``fn`` over the leading axis of the array arguments (one matrix at a time on each device: the
    bytes of ``fn`` on that matrix alone, whatever the batch or mesh), sharded over ``mesh``, with no padding
    copies.

    All arguments but a trailing scalar are batched. The largest multiple of the device count runs as one
    batch-sharded program over the whole mesh; the rest (``r`` matrices, fewer than the devices) runs as one
    program sharded over the first ``r`` devices, one matrix each, dispatched before anything is waited for.
    No device computes a copy (a stack of three on eight devices used to be padded with five copies of its
    first matrix, each materialised on the first device: 8 × 2.1 GB for a 128256×4096 embedding stack).
    ``fn`` should be a long-lived function (not a fresh lambda per call): its compiled program is cached by
    identity, mesh and shape.

    Returns:
      ``fn``'s results stacked: on the mesh when the batch is a multiple of the device count (and so fills every
      device), else on the host (numpy).
    """
    if mesh.axis_names != (axis,):
        raise ValueError(f"mesh must be 1-D with axis name {axis!r}, got axes {mesh.axis_names}")
    scalar = args[-1] if np.ndim(args[-1]) == 0 and len(args) > 1 else None
    batched = args[:-1] if scalar is not None else args
    b = batched[0].shape[0]
    full = b - b % mesh.size
    if full == b:
        return _run_on(fn, mesh, batched, scalar, axis)
    batched = [a if isinstance(a, np.ndarray) else np.asarray(a) for a in batched]   # host slices are free
    parts = [] if not full else [_run_on(fn, mesh, [a[:full] for a in batched], scalar, axis)]
    rest = sub_mesh(mesh, list(mesh.devices.flat[:b - full]), axis)
    parts.append(_run_on(fn, rest, [a[full:] for a in batched], scalar, axis))
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *parts)


def _run_on(fn, mesh: Mesh, batched, scalar, axis: str):
    """``fn`` over a batch whose size is a multiple of ``mesh.size``, sharded over it (not waited for)."""
    sh = NamedSharding(mesh, P(axis))
    batched = [jax.device_put(a, sh) for a in batched]
    call = _compiled(fn, mesh, len(batched), scalar is not None, axis)
    return call(*batched) if scalar is None else call(*batched, scalar)


def sub_mesh(mesh: Mesh, devices: list, axis: str = BATCH_AXIS) -> Mesh:
    """The 1-D mesh of some of ``mesh``'s devices (the whole mesh itself when they are all of them, in order,
    so its compiled programs are shared)."""
    if list(devices) == list(mesh.devices.flat):
        return mesh
    return Mesh(np.asarray(devices), (axis,))


# ----- rows of a stack spread over the devices ---------------------------------------------------
#: The row tiles a stack's rows are cut into (per ``ROW_TILES`` devices): every device count that divides it
#: (1, 2, 4, 8) computes the same tiles, so the results do not depend on it and no device computes padding.
ROW_TILES = 8


class RowPlan(NamedTuple):
    """How :func:`run_rows_sharded` cuts a (B, k) stack of rows into tiles.

    Attributes:
      tile: rows per tile.
      rows: (tiles, tile) int: the flat row (``matrix · k + row``) each tile slot computes (padding slots
        repeat their group's first row).
      group: (tiles,) int: the matrix whose shared operands each tile uses.
      slot: (B · k,) int: where each flat row's result is, ``tile_index · tile + position``.
      first_tile: (B,) int: a tile of each matrix (its per-tile outputs).
      needed: B · k, the rows the caller needs (the rest of ``tiles · tile`` is padding).
    """
    tile: int
    rows: np.ndarray
    group: np.ndarray
    slot: np.ndarray
    first_tile: np.ndarray
    needed: int


def same_bytes(a, b) -> bool:
    """Whether two arrays have the same shape, dtype and bytes."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    # a strided sample first: unequal Hessians (n×n, up to 485 MB each) differ there, without a full pass
    a, b = (np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in (a, b))
    return bool(np.array_equal(a[::4099], b[::4099]) and np.array_equal(a, b))


def same_operand_groups(items) -> list[list[int]]:
    """The indices of ``items`` (arrays, or tuples of arrays) grouped by byte-equal value, in order of first use
    (the matrices of a stack that share their operands: q, k and v their input Hessian)."""
    items = [it if isinstance(it, tuple) else (it,) for it in items]
    groups: list[list[int]] = []
    for i, it in enumerate(items):
        for g in groups:
            if all(same_bytes(a, b) for a, b in zip(items[g[0]], it)):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def row_plan(groups: list[list[int]], k: int, devices: int, tiles: int | None = None) -> RowPlan:
    """Cuts the rows of a (B, k) stack into tiles (the rows of each group of matrices that share their operands
    in tiles of their own), padded to a multiple of ``devices`` tiles.

    Args:
      groups: the matrices, grouped by shared operands (:func:`same_operand_groups`).
      k: rows per matrix.
      devices: the device count.
      tiles: the tile count aimed at; default :data:`ROW_TILES` times ``ceil(devices / ROW_TILES)``. The tile
        size ``ceil(B · k / tiles)`` does not depend on ``devices`` below that, so neither do the results.

    Returns:
      A :class:`RowPlan`.
    """
    tiles = tiles or ROW_TILES * -(-devices // ROW_TILES)
    needed = sum(len(g) for g in groups) * k
    tile = max(1, -(-needed // tiles))
    rows, real, group, first = [], [], [], {}
    for g in groups:
        flat = np.concatenate([np.arange(i * k, (i + 1) * k) for i in g])
        nt = -(-flat.size // tile)
        first.update({i: len(group) for i in g})
        rows.append(np.concatenate([flat, np.full(nt * tile - flat.size, flat[0])]))
        real.append(np.arange(nt * tile) < flat.size)
        group += [g[0]] * nt
    pad = (-len(group)) % devices
    rows = np.concatenate(rows + [np.full(pad * tile, rows[0][0])]).reshape(-1, tile)
    real = np.concatenate(real + [np.zeros(pad * tile, bool)])
    slot = np.empty(needed, np.int64)
    slot[rows.reshape(-1)[real]] = np.flatnonzero(real)        # every needed row is computed once
    return RowPlan(tile, rows, np.asarray(group + group[:1] * pad), slot,
                   np.asarray([first[i] for i in range(len(first))]), needed)


@functools.cache
def _compiled_rows(fn, mesh, n_rows, n_shared, with_scalar, axis):
    """``vmap(fn)`` over the tiles, each device on its own tiles (``shard_map``: no collective, not even for a
    batched ``while_loop`` predicate)."""
    def tile_fn(*a):
        rows, g, shared = a[:n_rows], a[n_rows], a[n_rows + 1:n_rows + 1 + n_shared]
        return fn(*rows, *(s[g] for s in shared), *a[n_rows + 1 + n_shared:])

    in_axes = (0,) * (n_rows + 1) + (None,) * (n_shared + with_scalar)
    specs = (P(axis),) * (n_rows + 1) + (P(),) * (n_shared + with_scalar)
    return jax.jit(jax.shard_map(jax.vmap(tile_fn, in_axes=in_axes), mesh=mesh, in_specs=specs,
                                 out_specs=P(axis), check_vma=False))


def run_rows_sharded(fn, mesh: Mesh, rows, shared, scalar=None, *, out_rows, axis: str = BATCH_AXIS,
                     tiles: int | None = None):
    """``vmap(fn)`` over a stack of matrices whose rows are independent, with the rows spread over ``mesh``.

    Where :func:`run_sharded` gives each device whole matrices (a stack of fewer matrices than devices leaves
    devices idle), this gives each device tiles of rows (:func:`row_plan`): a (B, k) stack costs at most
    ``tiles - 1`` padding rows per group of matrices sharing their operands, whatever B. Every tile runs the
    same program, whatever the device count (up to :data:`ROW_TILES` devices), so the results do not depend
    on it. ``fn`` should be long-lived (its compiled program is cached by identity).

    Args:
      fn: ``fn(*row_args, *shared_args, [scalar]) -> pytree``; row ``j`` of each output's row axis must
        depend only on row ``j`` of the ``row_args`` and on the shared arguments (e.g. GPTQ of V's rows: the
        error feedback stays in a row, the Hessian is shared).
      mesh: a 1-D mesh with axis ``axis``.
      rows: tuple of (B, k, ...) arrays (V (B, k, n), σ (B, k), widths (B, k)).
      shared: tuple of (B, ...) per-matrix operands (Hessians (B, n, n)); matrices whose operands are
        byte-equal share tiles, each distinct operand goes to every device once.
      scalar: an optional trailing scalar argument (the damping).
      out_rows: a pytree prefix of ``fn``'s output: for each leaf, the axis of its rows, or ``None`` for a value
        that depends on the shared operands only (taken from one tile of each matrix).
      tiles: the tile count aimed at (:func:`row_plan`).

    Returns:
      ``vmap(fn)``'s result over the stack (numpy): a row leaf of per-call shape ``(..., k, ...)`` as
      ``(B, ..., k, ...)``, a ``None`` leaf as ``(B, ...)``.
    """
    if mesh.axis_names != (axis,):
        raise ValueError(f"mesh must be 1-D with axis name {axis!r}, got axes {mesh.axis_names}")
    rows = [np.asarray(r) for r in rows]
    shared = [np.asarray(s) for s in shared]
    b, k = rows[0].shape[:2]
    plan = row_plan(same_operand_groups([tuple(s[i] for s in shared) for i in range(b)]), k, mesh.size, tiles)
    tiled = [r.reshape(b * k, *r.shape[2:])[plan.rows] for r in rows]
    uniq = sorted(set(plan.group.tolist()))
    index = np.searchsorted(uniq, plan.group).astype(np.int32)
    call = _compiled_rows(fn, mesh, len(rows), len(shared), scalar is not None, axis)
    extra = () if scalar is None else (scalar,)
    res = jax.device_get(call(*tiled, index, *(s[uniq] for s in shared), *extra))
    return jax.tree.map(lambda ax, x: _untile(x, ax, plan, b, k), out_rows, res,
                        is_leaf=lambda x: x is None)


#: Whether :func:`run_stack_rows` tiles rows on a mesh of several *CPU* devices. Off: simulated CPU devices
#: share the host's cores (tiles buy nothing there), and XLA:CPU's ``shard_map`` with several batch items per
#: simulated device can hang in a futex wait (seen once in a CI run, in-process with 8 simulated devices).
#: The row path is tested on CPU in child processes that turn this on (tests/test_mesh_rows.py).
ROWS_ON_CPU = False


def run_stack_rows(fn, mesh: Mesh, rows, shared, scalar=None, *, out_rows, axis: str = BATCH_AXIS):
    """``vmap(fn)`` over a stack whose rows are independent: by tiles of rows (:func:`run_rows_sharded`) on a
    mesh of several accelerators, by whole matrices (:func:`run_sharded`) on one device or on CPU devices
    (:data:`ROWS_ON_CPU`).

    One device computes no padding either way, and there fewer, larger batch items are faster: GPTQ's column
    loop costs about the same per batch item whatever its rows (on one CPU device the error tables of four
    256 x 512 matrices take 1.85x as long in 8 tiles as in 4 matrices). GPTQ of V's rows gives the same bytes
    by tiles and by whole matrices, so the choice changes no result (tests/test_mesh_rows.py); a batched
    product such as the error table's ``σ² (V − V̂) H (V − V̂)ᵀ`` may round with the batch (within 1e-6
    relative there; the same bytes through the entry points tested).

    Args:
      fn, mesh, rows, shared, scalar, out_rows, axis: as in :func:`run_rows_sharded` (``fn`` takes
        ``(*row_args, *shared_args, [scalar])`` in both cases).

    Returns:
      ``vmap(fn)``'s result over the stack, on the host (numpy), laid out as :func:`run_rows_sharded`'s.
    """
    if mesh.size > 1 and (ROWS_ON_CPU or not on_cpu(mesh)):
        return run_rows_sharded(fn, mesh, rows, shared, scalar, out_rows=out_rows, axis=axis)
    args = (*rows, *shared) + (() if scalar is None else (scalar,))
    return jax.tree.map(np.asarray, jax.device_get(run_sharded(fn, mesh, *args, axis=axis)))


def _untile(x, ax, plan: RowPlan, b: int, k: int):
    """One output leaf of the tiles (tiles, ...) back to the stack's layout (see :func:`run_rows_sharded`)."""
    if ax is None:
        return x[plan.first_tile]
    x = np.moveaxis(x, ax + 1, 1)                                  # (tiles, tile, ...)
    flat = x.reshape(-1, *x.shape[2:])[plan.slot]                  # (B·k, ...)
    return np.moveaxis(flat.reshape(b, k, *flat.shape[1:]), 1, ax + 1)


def useful_share(plan: RowPlan) -> float:
    """The share of the rows computed under ``plan`` that the caller needs."""
    return plan.needed / plan.rows.size
