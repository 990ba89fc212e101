"""The 1-D device mesh of a stack of same-shape matrices, and ``vmap`` programs sharded over it."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

#: The name of the one mesh axis: matrices of a stack are spread over it.
BATCH_AXIS = "batch"


def default_mesh(mesh: Mesh | None = None, axis: str = BATCH_AXIS) -> Mesh:
    """``mesh``, or a 1-D mesh over this process's devices when it is ``None`` (the inputs are host-local
    arrays; in a multi-process run each process compresses its own share)."""
    return mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), (axis,))


def single_device_mesh(axis: str = BATCH_AXIS) -> Mesh:
    """A 1-D mesh of the first device."""
    return Mesh(np.asarray(jax.devices()[:1]), (axis,))


@functools.cache
def _compiled(fn, mesh, n_batched, axis):
    sh = NamedSharding(mesh, P(axis))
    rep = NamedSharding(mesh, P())
    in_axes = (0,) * n_batched + (None,)
    if n_batched == 1:
        return jax.jit(jax.vmap(fn), in_shardings=sh, out_shardings=sh)
    return jax.jit(jax.vmap(fn, in_axes=in_axes), in_shardings=(sh,) * n_batched + (rep,), out_shardings=sh)


def run_sharded(fn, mesh: Mesh, *args, axis: str = BATCH_AXIS):
    """Runs ``vmap(fn)`` over the leading axis of the array arguments, sharded over ``mesh``.

    All arguments but a trailing scalar are batched. The batch is padded to a multiple of the
    device count with copies of its first element, and the padding is dropped from the result.
    ``fn`` should be a long-lived function (not a fresh lambda per call): its compiled program is
    cached by identity.

    Returns:
      ``vmap(fn)``'s result: on the mesh, or on the host (numpy) when the batch was padded.
    """
    if mesh.axis_names != (axis,):
        raise ValueError(f"mesh must be 1-D with axis name {axis!r}, got axes {mesh.axis_names}")
    scalar = args[-1] if np.ndim(args[-1]) == 0 and len(args) > 1 else None
    batched = args[:-1] if scalar is not None else args
    b = batched[0].shape[0]
    pad = (-b) % mesh.size
    if pad:
        batched = [jnp.concatenate([jnp.asarray(a), jnp.repeat(jnp.asarray(a)[:1], pad, axis=0)]) for a in batched]
    sh = NamedSharding(mesh, P(axis))
    batched = [jax.device_put(a, sh) for a in batched]
    call = _compiled(fn, mesh, len(batched), axis)
    res = call(*batched) if scalar is None else call(*batched, scalar)
    if not pad:
        return res
    # Slicing a sharded array compiles a program per shape; dropping the padding on the host is free.
    return jax.tree.map(lambda x: x[:b], jax.device_get(res))
