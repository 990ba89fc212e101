"""Distillation of a finished PrinMix delta against the fine-tuned model (``prinmix distill``; an option,
off by default: method.md §7).

Every SVD-quantised linear ``ΔŴ = Û diag(σ) V̂`` (block linears, and the embedding and output head
where the policy compressed them) keeps its widths, groups and zero points, so its byte count; what it
stores is re-fitted end to end: σ (float32, one per kept index); where a vector has more than one
quantisation group, the float16 group scales of Û and V̂; the codes of Û and V̂ themselves, moved within
their widths' grids (``refit_codes``, on); and the stored dense deltas (norm weights, biases) in their own
dtype. σ and scales are trained as multipliers ``σ · exp(a)``, ``s · exp(c)`` (signs kept, scale-free
steps), codes as offsets in grid steps, rounded and clipped in the forward pass with a straight-through
gradient (quantisation-aware training, Bengio et al., 2013), dense deltas as additive offsets, all by Adam
on the mean per-token ``KL(fine-tuned ‖ base + ΔŴ)`` over calibration windows: the objective of BitDelta's
scale distillation (Liu et al., 2024), on PrinMix's factors. The checkpoint's layout and byte count are
unchanged, so every reader, ``apply`` and the serving bank take the result as it is.

Measured on the demo pair (docs/benchmarks.md, "Below one bit"): with windows of the fine-tuning task the
task accuracy at 1/32 rises from 43% to 91% (77% without moving the codes); with generic text the KL on
that text falls while the task accuracy falls too, so distil on data of the skill the fine-tune is for.

Both models are held whole (float32) with the calibration activations of one batch: this is for models that
fit one host or device, not for 7B-scale deltas on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.core.gptq import HIGHEST
from prinmix_jax.core.packing import pack_bits, unpack_bits
from prinmix_jax.evaluation import padded_batches
from prinmix_jax.formats import SVDQuantDelta, dequant_codes

__all__ = ["distill_delta", "distill_targets"]


def distill_targets(cm: SVDQuantDelta, codes: bool = False) -> dict:
    """The zero multipliers ``{"sigma": …, "u_scale": …, "v_scale": …}`` (per width group) of what
    distillation re-fits in ``cm``: every σ, and the scales of a factor with more than one group per vector
    (a single group's scale is 1 in a lean checkpoint, folded into σ, and not stored). With ``codes``, also
    ``"u_code"`` (k_b, m) and ``"v_code"`` (k_b, n): offsets of every code, in grid steps, rounded
    (straight-through) in the forward pass."""
    def scales(arrs):
        return tuple(jnp.zeros(a.shape, jnp.float32) if a.shape[-1] > 1 else None for a in arrs)
    t = {"sigma": tuple(jnp.zeros(s.shape, jnp.float32) for s in cm.sigma),
         "u_scale": scales(cm.u_scale), "v_scale": scales(cm.v_scale)}
    if codes:
        m, n = cm.shape
        t["u_code"] = tuple(jnp.zeros((s.shape[0], m), jnp.float32) for s in cm.sigma)
        t["v_code"] = tuple(jnp.zeros((s.shape[0], n), jnp.float32) for s in cm.sigma)
    return t


def _codes(cm: SVDQuantDelta) -> dict:
    """The unpacked codes ``{"u_code": ((k_b, m) float32, ...), "v_code": ...}`` of ``cm`` (host arrays)."""
    m, n = cm.shape
    return {f"{side}_code": tuple(
        unpack_bits(np.asarray(c), b, length).astype(np.float32)
        for c, b in zip(getattr(cm, f"{side}_codes"), cm.group_bits)) for side, length in (("u", m), ("v", n))}


def _moved(q, offset, bits: int):
    """Codes ``q`` moved by ``offset`` grid steps, clipped to the width's range and rounded, with the
    straight-through gradient of the rounding (Bengio et al., 2013)."""
    x = jnp.clip(q + offset, 0, 2 ** bits - 1)
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _student_weight(cm: SVDQuantDelta, t: dict, q: dict | None = None, code_gain: float = 1.0):
    """``Û diag(σ) V̂`` (m, n) float32 of ``cm`` under the re-fitted values ``t`` (codes moved when ``t``
    has code offsets; ``q`` are the unpacked codes of :func:`_codes`, offsets are ``code_gain · t``)."""
    new = _scaled(cm, t)
    if "u_code" not in t:
        return new.reconstruct()
    u, v = (jnp.concatenate([
        dequant_codes(_moved(q[f"{name}_code"][i], code_gain * t[f"{name}_code"][i], b),
                      getattr(new, f"{name}_scale")[i], getattr(new, f"{name}_zero")[i], b, cm.group_size)
        for i, b in enumerate(cm.group_bits)]) for name in ("u", "v"))
    sig = jnp.concatenate([jnp.asarray(s, jnp.float32) for s in new.sigma])
    return jnp.matmul(u.T * sig[None, :], v, precision=HIGHEST)


def _scaled(cm: SVDQuantDelta, t: dict) -> SVDQuantDelta:
    def mul(arrs, logs):
        return tuple(a if c is None else jnp.asarray(a, jnp.float32) * jnp.exp(c) for a, c in zip(arrs, logs))
    return dataclasses.replace(cm, sigma=mul(cm.sigma, t["sigma"]), u_scale=mul(cm.u_scale, t["u_scale"]),
                               v_scale=mul(cm.v_scale, t["v_scale"]))


def _stored(cm: SVDQuantDelta, t: dict, q: dict | None = None, code_gain: float = 1.0) -> dict:
    """The re-fitted leaves as the checkpoint stores them: ``{"sigma_<b>": float32, "u_scale_<b>": float16}``,
    and with code offsets in ``t`` the packed ``"u_codes_<b>"``, ``"v_codes_<b>"`` (uint8)."""
    out = {}
    if "u_code" in t:
        for side in ("u", "v"):
            for i, b in enumerate(cm.group_bits):
                moved = np.asarray(_moved(q[f"{side}_code"][i], code_gain * t[f"{side}_code"][i], b))
                out[f"{side}_codes_{b}"] = pack_bits(moved.astype(np.uint8), b)
    new = _scaled(cm, t)
    f16 = np.finfo(np.float16)
    for i, b in enumerate(cm.group_bits):
        out[f"sigma_{b}"] = np.asarray(new.sigma[i], np.float32)
        for side in ("u_scale", "v_scale"):
            if t[side][i] is not None:
                a = np.asarray(getattr(new, side)[i], np.float32)
                out[f"{side}_{b}"] = np.clip(a, f16.tiny, f16.max).astype(np.float16)
    return out


def _load_params(src) -> dict:
    from prinmix_jax.models import load_hf_params

    p = load_hf_params(src) if isinstance(src, (str, os.PathLike)) else src
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)


def distill_delta(base, finetuned, delta, out, *, calib, seq_len: int = 128, num_sequences: int | None = None,
                  tokenizer_dir=None, steps: int = 400, lr: float = 3e-3, batch_size: int = 8, seed: int = 0,
                  overwrite: bool = False, force: bool = False, log: Callable[[str], None] | None = None,
                  refit_dense: bool = True, refit_codes: bool = True, code_lr: float = 0.01) -> dict:
    """Re-fits σ, the group scales, the codes and the dense deltas of a PrinMix delta checkpoint against the
    fine-tuned model's outputs (module docstring) and writes the result as a new delta checkpoint.

    Args:
      base, finetuned: Hugging Face checkpoint folders (or param trees) of the delta's models.
      delta: the delta checkpoint (folder or :class:`~prinmix_jax.storage.DeltaCheckpoint`) to re-fit.
      out: the output folder (written as ``out + ".partial"``, then renamed).
      calib: calibration data, as for ``compress_model`` (a text / JSONL / ``.npy`` file or int ids); use data
        of the fine-tuning task.
      seq_len, num_sequences: calibration windows.
      tokenizer_dir: tokenizer folder for text (default: the fine-tuned checkpoint folder).
      steps, lr, batch_size, seed: Adam steps, learning rate, windows per step, window-sampling seed.
      overwrite: replace an existing prinmix output at ``out``.
      force: skip the base fingerprint check.
      log: progress lines (e.g. ``print``).
      refit_dense: also re-fit the stored dense deltas (norms, biases; an additive offset on each, stored in
        its own dtype). Measured on the demo pair at 1/32 (codes fixed, 200 steps): 61.7% task accuracy
        without, 76.7% with.
      refit_codes: also move the codes of Û and V̂ within their widths' grids (quantisation-aware training
        with a straight-through rounding; widths, groups and zero points stay, so the bytes do too).
        Measured on the demo pair at 1/32: 76.7% task accuracy without (200 steps), 90.0% with (200 steps),
        91.0% with (400 steps, the default).
      code_lr: the step of the code offsets, in grid steps per Adam step (a code changes once its offset
        passes half a step).

    Returns:
      ``{"kl_before", "kl_after", "kl_trained", "kept", "matrices", "parameters", "steps", "seconds", "bytes",
      "codes_changed"}`` (the last with ``refit_codes``: how many codes differ from the input's):
      the mean per-token KL over all calibration windows of the input and of the written delta, and of the
      trained values; ``kept`` is False when training did not lower it, and the output then holds the input's
      values unchanged (``kl_after == kl_before``).

    Raises:
      ValueError: bad settings, no PrinMix-format matrix to re-fit, or ``out`` would overwrite an input.
      FingerprintMismatchError: ``base`` is not the delta's base (unless ``force``).
    """
    import optax

    from prinmix_jax.apply import _model_config_of, apply_delta
    from prinmix_jax.delta_tree import entry_name, param_groups
    from prinmix_jax.models import check_params, model_from_params
    from prinmix_jax.models.calibration_data import tokenize_calibration
    from prinmix_jax.models.llama.params import get_path, set_path
    from prinmix_jax.storage import STEPS_DIR, StepStore, check_output_location, load_delta
    from prinmix_jax.storage.format import META_FILE, array_sha256, meta_digest
    from prinmix_jax.storage.outputs import publish, write_json_atomic

    say = log or (lambda _: None)
    if int(steps) < 0 or int(batch_size) < 1 or not float(lr) >= 0:
        raise ValueError(f"steps must be >= 0, batch_size >= 1 and lr >= 0; got {steps}, {batch_size}, {lr}")
    delta = load_delta(delta)
    inputs = [x for x in (base, finetuned, calib, tokenizer_dir, delta.path) if isinstance(x, (str, os.PathLike))]
    out = check_output_location(out, overwrite, inputs=inputs, scratch_suffixes=(".partial",))
    t0 = time.perf_counter()
    cfg = _model_config_of(delta)
    base_p = _load_params(base)
    ft_p = _load_params(finetuned)
    check_params(ft_p, cfg)
    merged = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), apply_delta(base_p, delta, force=force))
    tdir = tokenizer_dir or (finetuned if isinstance(finetuned, (str, os.PathLike)) else None)
    ids = np.asarray(tokenize_calibration(calib, tdir, seq_len=seq_len, num_sequences=num_sequences,
                                          model_config=cfg), np.int32)

    block_table, global_table = param_groups(cfg)
    tables = {"block": {entry_name(p): p for p, _ in block_table},
              "global": {entry_name(p): p for p, _ in global_table}}
    cms = {}                     # (step, name) -> (matrix, path, base weight); step 0 = globals, b + 1 = block b
    dense = {}                   # stored dense deltas (norms, biases): (step, key) -> (delta, path)
    for s in range(delta.num_steps):
        base_tree = base_p if s == 0 else base_p["layers"][s - 1]
        paths = tables["global" if s == 0 else "block"]
        bd = delta.step(s)       # one read (and checksum pass) per step
        for name, cm in bd.linears.items():
            if isinstance(cm, SVDQuantDelta) and cm.rank:
                cms[(s, name)] = (cm, paths[name], get_path(base_tree, paths[name]))
        if refit_dense:
            for key, a in bd.dense.items():
                if a is not None:
                    dense[(s, key)] = (np.asarray(a), tuple(key.split("/")))
    if not cms:
        raise ValueError(f"{delta.path}: no SVD-quantised linear to distil (methods prinmix, deltacome, "
                         "uniform have them)")
    if refit_codes and not float(code_lr) > 0:
        raise ValueError(f"code_lr must be > 0, got {code_lr}")
    gain = float(code_lr) / float(lr) if refit_codes and float(lr) > 0 else 1.0
    qs = {k: _codes(cm) for k, (cm, _, _) in cms.items()} if refit_codes else {}
    theta0 = {f"{s}/{n}": distill_targets(cm, refit_codes) for (s, n), (cm, _, _) in cms.items()}
    theta0.update({f"dense:{s}/{k}": jnp.zeros(a.shape, jnp.float32) for (s, k), (a, _) in dense.items()})
    nparam = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(theta0))

    # The models, the input delta's arrays and the base weights go into the programs as arguments: closed over,
    # JAX would embed them in the compiled programs as constants (both models' weights, in every program). Put
    # on the device once here (the unpacked codes are host arrays), not at every step's call.
    consts = jax.device_put({"ft": ft_p, "merged": merged,
                             "cm": {f"{s}/{n}": cm for (s, n), (cm, _, _) in cms.items()},
                             "w0": {f"{s}/{n}": w0 for (s, n), (_, _, w0) in cms.items()},
                             "q": {f"{s}/{n}": q for (s, n), q in qs.items()}})

    def student(theta, c):
        trees = [c["merged"]] + [c["merged"]["layers"][b] for b in range(delta.num_blocks)]    # index = step
        for (s, name), (_, path, _) in cms.items():
            key = f"{s}/{name}"
            w = _student_weight(c["cm"][key], theta[key], c["q"].get(key), gain)
            trees[s] = set_path(trees[s], path, c["w0"][key] + w)
        for (s, key), (_, path) in dense.items():
            trees[s] = set_path(trees[s], path, get_path(trees[s], path) + theta[f"dense:{s}/{key}"])
        return dict(trees[0], layers={b: trees[b + 1] for b in range(delta.num_blocks)})

    def token_kl(theta, c, x):
        lt = jax.nn.log_softmax(model_from_params(cfg, c["ft"])(x).astype(jnp.float32), -1)
        lm = jax.nn.log_softmax(model_from_params(cfg, student(theta, c))(x).astype(jnp.float32), -1)
        return jnp.sum(jnp.exp(lt) * (lt - lm), -1)

    def kl(theta, c, x):
        return jnp.mean(token_kl(theta, c, x))

    opt = optax.adam(lr)

    @jax.jit
    def step(theta, state, c, x):
        loss, g = jax.value_and_grad(kl)(theta, c, x)
        upd, state = opt.update(g, state, theta)
        return optax.apply_updates(theta, upd), state, loss

    score = jax.jit(lambda theta, c, x, w: jnp.sum(token_kl(theta, c, x) * w))
    bs = min(int(batch_size), len(ids))

    def mean_kl(theta):   # a partial last batch is padded (weight 0): one compiled program for every batch
        return sum(float(score(theta, consts, x, w)) for x, w in padded_batches(ids, bs)) / ids.size

    kl_before = mean_kl(theta0)
    say(f"distil: {len(cms)} matrices, {nparam} parameters, {len(ids)} windows of {ids.shape[1]}; "
        f"KL before {kl_before:.4f}")
    theta, state = theta0, opt.init(theta0)
    rng = np.random.default_rng(seed)
    for i in range(int(steps)):
        theta, state, loss = step(theta, state, consts, jnp.asarray(ids[rng.choice(len(ids), bs, replace=False)]))
        if log and (i + 1) % max(1, int(steps) // 10) == 0:
            say(f"distil: step {i + 1}/{steps}, batch KL {float(loss):.4f}")
    stored = {k: _stored(cms[k][0], theta[f"{k[0]}/{k[1]}"], qs.get(k), gain) for k in cms}
    # the score of what is stored (float16 scales), not of the float32 multipliers
    theta_st = {f"{s}/{n}": _logs_of(cms[(s, n)][0], stored[(s, n)], theta0[f"{s}/{n}"], qs.get((s, n)), gain)
                for (s, n) in cms}
    stored_dense = {k: (a.astype(np.float32) + np.asarray(theta[f"dense:{k[0]}/{k[1]}"])).astype(a.dtype)
                    for k, (a, _) in dense.items()}
    theta_st.update({f"dense:{s}/{k}": jnp.asarray(stored_dense[(s, k)].astype(np.float32) - a.astype(np.float32))
                     for (s, k), (a, _) in dense.items()})
    kl_trained = mean_kl(theta_st)
    # codes that differ from the input's: the nonzero offsets of the stored codes
    changed = sum(int(np.count_nonzero(np.asarray(o))) for k in qs for side in ("u_code", "v_code")
                  for o in theta_st[f"{k[0]}/{k[1]}"][side])
    kept = kl_trained < kl_before
    kl_after = kl_trained if kept else kl_before
    moved = f", {changed} codes moved" if refit_codes else ""
    say(f"distil: KL after {kl_trained:.4f}{moved} ({'kept' if kept else 'not lower: the input values are kept'})")

    work = out + ".partial"
    if os.path.lexists(work):
        shutil.rmtree(work)
    try:
        os.makedirs(work)
        for item in os.listdir(delta.path):
            if item == STEPS_DIR:
                continue
            src = os.path.join(delta.path, item)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(work, item))
        src_store = delta._store
        dst = StepStore(os.path.join(work, STEPS_DIR), run_identity=src_store.run_identity())
        for s in range(delta.num_steps):
            arrays, meta = src_store.restore(s)
            meta = {k: v for k, v in meta.items() if k not in ("meta_sha256", "has_arrays")}
            if kept:
                for (step_, name), new in stored.items():
                    if step_ != s:
                        continue
                    entry, st = meta["linears"][name], arrays["linears"][name]
                    for key, a in new.items():
                        old = np.asarray(st[key])
                        if old.shape != a.shape or old.dtype != a.dtype:
                            raise AssertionError(f"{name}/{key}: {a.shape} {a.dtype} against {old.shape} {old.dtype}")
                        st[key] = a
                        entry["sha256"][key] = array_sha256(a)
                    entry["info"] = dict(entry.get("info") or {}, distilled=True)
                for (step_, key), new in stored_dense.items():
                    if step_ != s:
                        continue
                    node = arrays["dense"]
                    parts = key.split("/")
                    for part in parts[:-1]:
                        node = node[part]
                    node[parts[-1]] = new
                    meta["dense"][key]["sha256"] = array_sha256(new)
            dst.save(s, arrays, meta)
        dst.close()
        mfile = os.path.join(work, META_FILE)
        with open(mfile, encoding="utf-8") as f:
            top = json.load(f)
        info = {"steps": int(steps), "lr": float(lr), "batch_size": bs, "seed": int(seed), "windows": int(len(ids)),
                "seq_len": int(ids.shape[1]), "kl_before": kl_before, "kl_after": kl_after, "kl_trained": kl_trained,
                "kept": bool(kept), "refit_dense": bool(refit_dense), "refit_codes": bool(refit_codes),
                **({"code_lr": float(code_lr), "codes_changed": changed} if refit_codes else {}),
                "source": os.path.basename(os.fspath(calib)) if isinstance(calib, (str, os.PathLike)) else "ids"}
        top = {k: v for k, v in top.items() if k != "meta_sha256"}
        top["distillation"] = info
        top["meta_sha256"] = meta_digest(top)
        write_json_atomic(mfile, top)
        publish(work, out, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)   # nothing half-written is left
        raise
    secs = time.perf_counter() - t0
    return dict(info, matrices=len(cms), parameters=nparam, seconds=secs, bytes=int(top["bytes"]["total"]),
                path=out)


def _logs_of(cm: SVDQuantDelta, stored: dict, like: dict, q: dict | None = None, code_gain: float = 1.0) -> dict:
    """The multipliers (as logs) that turn ``cm``'s values into the ``stored`` ones, and the code offsets
    (over ``code_gain``) that give the stored codes."""
    out = {}
    if "u_code" in like:
        m, n = cm.shape
        for side, length in (("u", m), ("v", n)):
            out[f"{side}_code"] = tuple(
                jnp.asarray((unpack_bits(stored[f"{side}_codes_{b}"], b, length).astype(np.float32)
                             - q[f"{side}_code"][i]) / code_gain) for i, b in enumerate(cm.group_bits))
    for side, field in (("sigma", "sigma"), ("u_scale", "u_scale"), ("v_scale", "v_scale")):
        vals = []
        for i, b in enumerate(cm.group_bits):
            if like[side][i] is None:
                vals.append(None)
                continue
            old = np.asarray(getattr(cm, field)[i], np.float64)
            new = np.asarray(stored[f"{field}_{b}"], np.float64)
            ratio = np.where(old != 0, new / np.where(old != 0, old, 1), 1.0)
            vals.append(jnp.asarray(np.log(np.maximum(ratio, 1e-30)), jnp.float32))
        out[side] = tuple(vals)
    return out
