"""Whole-model compression: stream base and fine-tuned checkpoints block by block, compress every
decoder-block linear (method.md §6), treat the other parameters by a stated policy, write an Orbax delta
checkpoint (see :mod:`prinmix_jax.storage`) that resumes after a crash.

Data flow (one way): checkpoints -> deltas -> core (``compress_stack`` / ``compress_matrix``) ->
allocation -> storage -> apply (:mod:`prinmix_jax.apply`).

Work units ("steps"): step 0 = the globals (embedding, final norm, output head), step ``b + 1`` = decoder
block ``b``. Same-shape matrices of a step that share an input Hessian (k/v, gate/up, ...) are compressed
together as one stack (the SVD and error table run sharded over a device mesh when the core provides
``compress_stack``). Peak host memory is about one block of both models plus the calibration hidden states.

Multi-process (``jax.distributed``, one process per host): matrix ``j`` of step ``s`` is compressed by
process ``(16 s + j) % process_count``, which also writes it: after every step the processes exchange
only the step's JSON metadata, then each writes its own arrays into the shared Orbax step (see
:mod:`prinmix_jax.storage`). With the global scope the error tables of the first pass are split the same
way, gathered (they are small), and process 0 solves the one ILP and broadcasts the widths. Sequential
calibration reads each finished step back from the shared checkpoint. Results do not depend on the number
of devices or processes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from prinmix_jax.allocation import allocate_bits_global, index_cost_bits
from prinmix_jax.compress import check_settings, compress_stack, error_tables
from prinmix_jax.config import METHODS, CompressionConfig
from prinmix_jax.models.llama.params import iter_leaves as _leaves
from prinmix_jax.storage import (FORMAT, FORMAT_VERSION, HF_DIR, OUTPUT_MARKER, STEPS_DIR, StepStore, _file_sha256,
                                 check_output_location, write_output_marker, write_summary,
                                 combine_fingerprint, decode_step, encode_step, owned_tree, publish, tensor_digest)

__all__ = ["ParamPolicy", "compress_model", "init_distributed", "IncompatibleModelsError", "NonFiniteWeightsError",
           "result_problems", "CALIBRATION_MODES",
           "merge_block", "param_groups"]

CALIBRATION_MODES = ("parallel", "sequential")
SCOPES = ("matrix", "global")
_POLICY_CHOICES = {"norms": ("store", "skip"), "biases": ("store", "skip"),
                   "embeddings": ("compress", "store", "skip"), "lm_head": ("compress", "store", "skip")}
_STORE_DTYPES = ("float16", "float32")
_STEP_STRIDE = 16  # > number of entries in a step; assignment of entries to processes


class IncompatibleModelsError(ValueError):
    """Base and fine-tuned models differ in architecture, tensor names or shapes."""


class NonFiniteWeightsError(ValueError):
    """A base or fine-tuned tensor holds NaN or Inf."""


@dataclasses.dataclass(frozen=True)
class ParamPolicy:
    """What happens to the parameters that are not decoder-block linears.

    Attributes:
      norms: RMSNorm weights (block norms, q/k norms, final norm): ``"store"`` the delta in
        ``store_dtype`` or ``"skip"`` it (the base value is kept at apply).
      biases: linear biases (Qwen2 q/k/v, Llama ``attention_bias`` / ``mlp_bias``): ``"store"`` or ``"skip"``.
      embeddings: the token embedding ``[V, D]``: ``"compress"`` it like a linear with the same method and
        budget but data-free (identity Hessian), ``"store"`` the dense delta, or ``"skip"``.
      lm_head: the untied output head ``[V, D]``: same choices (ignored for tied embeddings).
      store_dtype: ``"float16"`` or ``"float32"`` for stored dense deltas.

    Whatever is stored is counted in the reported model-level ratio. A delta that is exactly zero is
    recorded as zero and costs nothing, whatever the policy.
    """
    norms: str = "store"
    biases: str = "store"
    embeddings: str = "compress"
    lm_head: str = "compress"
    store_dtype: str = "float16"

    def __post_init__(self):
        for k, choices in _POLICY_CHOICES.items():
            if getattr(self, k) not in choices:
                raise ValueError(f"policy {k}={getattr(self, k)!r}: choose one of {', '.join(choices)}")
        if self.store_dtype not in _STORE_DTYPES:
            raise ValueError(f"policy store_dtype={self.store_dtype!r}: choose one of {', '.join(_STORE_DTYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----- model sources -----------------------------------------------------------------------------
class _Source:
    """A checkpoint folder, a CheckpointReader, an NNX model or a param tree, read block by block."""

    def __init__(self, obj, model_config, label: str):
        from flax import nnx

        from prinmix_jax.models import CheckpointReader, check_params, params_from_model

        self.label, self.reader, self.params, self.path = label, None, None, None
        if isinstance(obj, (str, os.PathLike)):
            self.path = os.fspath(obj)
            self.reader = CheckpointReader(self.path)
            self.config = self.reader.config
        elif isinstance(obj, CheckpointReader):
            self.reader, self.path, self.config = obj, obj.path, obj.config
        elif isinstance(obj, nnx.Module):
            self.params, self.config = params_from_model(obj), obj.config
        elif isinstance(obj, dict):
            if model_config is None:
                raise ValueError(f"{label}: a param tree needs model_config=ModelConfig(...)")
            self.params, self.config = obj, model_config
            check_params(self.params, self.config)
        else:
            raise TypeError(f"{label}: expected a checkpoint folder, CheckpointReader, CausalLM or param tree, "
                            f"got {type(obj).__name__}")

    def _read(self, fn):
        # Copy out of the memory map and drop the file handles after every read: mapped pages count towards
        # the process RSS, so keeping the maps open would make the peak grow with the model size.
        tree = jax.tree.map(lambda a: np.array(a, np.float32, copy=True), fn())
        self.reader.close()
        return tree

    def block(self, b: int) -> dict:
        if self.reader is not None:
            tree = self._read(lambda: self.reader.read_block(b, None, device_put=False))
        else:
            tree = jax.tree.map(lambda a: np.asarray(a, np.float32), self.params["layers"][b])
        return self._check_finite(tree, b)

    def globals(self) -> dict:
        if self.reader is not None:
            tree = self._read(lambda: self.reader.read_globals(None, device_put=False))
        else:
            tree = {k: jax.tree.map(lambda a: np.asarray(a, np.float32), v)
                    for k, v in self.params.items() if k != "layers"}
        return self._check_finite(tree, None)

    def _check_finite(self, tree: dict, block: int | None) -> dict:
        """Refuses a tensor with NaN or Inf as soon as it is read, naming it (HF name) and its block."""
        from prinmix_jax.models.llama.params import block_param_table, global_param_table

        table = [(f"model.layers.{block}.{suffix}", path) for suffix, path, _ in block_param_table(self.config)] \
            if block is not None else [(name, path) for name, path, _ in global_param_table(self.config)]
        for name, path in table:
            try:
                a = _get(tree, path)
            except (KeyError, TypeError):
                continue
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                where = f"block {block}" if block is not None else "outside the decoder blocks"
                src = f" ({self.path})" if self.path else ""
                raise NonFiniteWeightsError(
                    f"{self.label} model{src}: tensor {name} ({where}) has {bad} NaN/Inf value(s) of {a.size}; "
                    "a checkpoint with non-finite weights cannot be compressed")
        return tree

    def header_digest(self) -> str:
        """Cheap identity: tensor names, shapes and stored dtypes (and file sizes for folders)."""
        h = hashlib.sha256()
        if self.reader is not None:
            for name in self.reader.names():
                a = self.reader._open(os.path.basename(self.reader.file_of(name))).get_slice(name)
                h.update(f"{name}:{a.get_shape()}:{a.get_dtype()};".encode())
            for f in sorted({self.reader.file_of(n) for n in self.reader.names()}):
                h.update(f"{os.path.basename(f)}={os.path.getsize(f)};".encode())
        else:
            for path, leaf in sorted(_leaves(self.params), key=lambda x: str(x[0])):
                h.update(f"{path}:{tuple(leaf.shape)}:{leaf.dtype};".encode())
                h.update(np.asarray(leaf, np.float32).tobytes())
        return h.hexdigest()

    def close(self):
        if self.reader is not None and self.path is not None:
            self.reader.close()


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    """In-place set on nested dicts (our own copies)."""
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _check_compatible(base: _Source, ft: _Source) -> None:
    from prinmix_jax.models.llama.params import expected_tensors

    cb, cf = base.config, ft.config
    if cb.architecture != cf.architecture or cb.model_type != cf.model_type:
        raise IncompatibleModelsError(f"base is a {cb.architecture} ({cb.model_type}) but the fine-tuned model is a "
                                      f"{cf.architecture} ({cf.model_type}); a delta needs the same architecture")
    eb, ef = expected_tensors(cb), expected_tensors(cf)
    if set(eb) != set(ef):
        diff = sorted(set(eb) ^ set(ef))
        raise IncompatibleModelsError(f"base and fine-tuned models have different tensors, e.g. {diff[:4]}")
    for name in sorted(eb):
        if eb[name][1] != ef[name][1]:
            raise IncompatibleModelsError(f"tensor {name!r} has shape {eb[name][1]} in the base but {ef[name][1]} in "
                                          "the fine-tuned model (different sizes or vocabulary)")


# ----- parameter classification ------------------------------------------------------------------
def param_groups(config) -> tuple[list, list]:
    """``(block_table, global_table)``: for every tensor, ``(path, policy_key)`` where policy_key is
    ``"linear"``, ``"norms"``, ``"biases"``, ``"embeddings"`` or ``"lm_head"``."""
    from prinmix_jax.models.llama.params import block_param_table, global_param_table

    def kind(path):
        if path[-1] == "bias":
            return "biases"
        if path[0] == "embed_tokens":
            return "embeddings"
        if path[0] == "lm_head":
            return "lm_head"
        if path[-2].endswith("norm"):
            return "norms"
        return "linear"

    return ([(p, kind(p)) for _, p, _ in block_param_table(config)],
            [(p, kind(p)) for _, p, _ in global_param_table(config)])


def _entry_name(path) -> str:
    return path[-2] if path[-1] == "weight" else "/".join(path)


def merge_block(base_tree: dict, bd, table) -> dict:
    """``base + reconstructed delta`` for one step, in float32 (a new tree; ``base_tree`` is not changed).

    Args:
      base_tree: the step's base params (float32 NumPy), block subtree or globals dict.
      bd: the step's :class:`~prinmix_jax.storage.BlockDelta`.
      table: the step's ``(path, kind)`` list from :func:`param_groups`.
    """
    out = jax.tree.map(lambda a: np.array(a, np.float32), base_tree)
    for path, kind in table:
        base = np.asarray(_get(base_tree, path), np.float32)
        key = "/".join(path)
        name = _entry_name(path)
        if name in bd.linears:
            cm = bd.linears[name]
            if cm is not None:
                _set(out, path, base + np.asarray(cm.reconstruct(), np.float32))
        elif key in bd.dense:
            d = bd.dense[key]
            if d is not None:
                _set(out, path, base + d.astype(np.float32))
    return out


# ----- distributed -------------------------------------------------------------------------------
def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` (no arguments on Cloud TPU: the slice describes itself).

    On CPU the cross-process collectives use gloo. Call before any other JAX work.
    """
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # option absent in some builds
        pass
    kw = {}
    if coordinator is not None:
        kw.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kw)


def _allgather_bytes(mine: bytes) -> list[bytes]:
    """Every process's ``mine``, in process order (``[mine]`` with one process)."""
    if jax.process_count() == 1:
        return [mine]
    from jax.experimental import multihost_utils

    buf = np.frombuffer(mine, np.uint8)
    lens = np.asarray(multihost_utils.process_allgather(np.array([buf.size], np.int64))).reshape(-1)
    padded = np.zeros(max(int(lens.max()), 1), np.uint8)
    padded[:buf.size] = buf
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [everything[p, :int(lens[p])].tobytes() for p in range(jax.process_count())]


def _allgather_json(obj) -> list:
    return [json.loads(b.decode()) for b in _allgather_bytes(json.dumps(obj).encode())]


def _allgather_arrays(items: list[tuple[Any, np.ndarray]]) -> list[tuple[Any, np.ndarray]]:
    """Every process's ``(JSON-able key, array)`` pairs, concatenated in process order."""
    header = json.dumps([[k, a.dtype.str, list(a.shape)] for k, a in items]).encode()
    mine = len(header).to_bytes(8, "little") + header + b"".join(np.ascontiguousarray(a).tobytes() for _, a in items)
    out = []
    for buf in _allgather_bytes(mine):
        n = int.from_bytes(buf[:8], "little")
        off = 8 + n
        for k, dt, shape in json.loads(buf[8:off].decode()):
            dt = np.dtype(dt)
            nb = int(np.prod(shape)) * dt.itemsize
            out.append((k, np.frombuffer(buf[off:off + nb], dt).reshape(shape).copy()))
            off += nb
    return out


def _owner(step: int, j: int) -> int:
    """The process that compresses (and writes) entry ``j`` of ``step``."""
    return (_STEP_STRIDE * step + j) % jax.process_count()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _broadcast_array(x: np.ndarray) -> np.ndarray:
    """Process 0's ``x`` on every process (every process passes an array of the same shape and dtype)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _broadcast_int(x: int) -> int:
    return int(_broadcast_array(np.array(x, np.int64)))


# ----- compression of one stack ------------------------------------------------------------------
def _json_info(info: dict, cm) -> dict:
    keep = ("rel_output_error", "budget_bits", "nbytes", "seconds", "solver", "allocation_seconds",
            "seconds_error_table", "seconds_u", "v_damp", "u_damp", "rtc_damp")
    out = {}
    for k in keep:
        if k in info and info[k] is not None:
            v = info[k]
            out[k] = v if isinstance(v, str) else float(v)
    bits = cm.bits
    out["rank"] = None if cm.rank is None else int(cm.rank)
    if bits is not None:
        u, c = np.unique(np.asarray(bits), return_counts=True)
        out["widths"] = {str(int(b)): int(n) for b, n in zip(u, c)}
    return out


def _compress_stack(deltas, hessians, config, method, mesh, widths=None, u_rank=None):
    """One stack of same-shape matrices (with their Hessians or None) -> [(cm, info)]."""
    hs = None if hessians is None else np.stack(hessians)
    return compress_stack(np.stack(deltas), hs, config, method, mesh=mesh, widths=widths, u_rank=u_rank,
                          return_info=True)


def _default_mesh():
    from jax.sharding import Mesh

    return Mesh(np.array(jax.local_devices()), ("batch",))


def _compress_entries(items, config, method, mesh, step, widths=None, u_ranks=None) -> dict:
    """``items``: ordered list of (name, delta (m, n) f32, hessian or None). Returns this process's entries.

    ``widths``: optional {name: (r,) widths} from a global allocation; ``u_ranks`` then maps every linear
    name to its largest kept rank over the model, and each shape's U step is padded to the largest of
    its names (one set of U programs per shape for the whole model).
    """
    me = jax.process_index()
    mine = [(j, it) for j, it in enumerate(items) if _owner(step, j) == me]
    entries, groups = {}, {}
    for _, (name, d, h, hkey) in mine:
        if not np.any(d):
            entries[name] = ("zero", d.shape, {"rel_output_error": 0.0, "nbytes": 0})
            continue
        groups.setdefault((d.shape, hkey), []).append((name, d, h))
    for members in groups.values():
        names = [m[0] for m in members]
        hs = None if members[0][2] is None else [m[2] for m in members]
        ws = None if widths is None else [widths[n] for n in names]
        shape = members[0][1].shape
        ur = None if u_ranks is None else max(u_ranks.get(it[0], 0) for it in items if it[1].shape == shape)
        for name, (cm, info) in zip(names, _compress_stack([m[1] for m in members], hs, config, method, mesh, ws,
                                                           ur)):
            entries[name] = ("matrix", cm, _json_info(info, cm))
    ordered = {}
    for name, *_ in items:
        if name in entries:
            ordered[name] = entries[name]
    return ordered


def _save_step(store, step: int, items, local: dict, dense: dict, extra_meta: dict) -> dict:
    """Writes one step: this process's ``local`` linear entries (of the ordered ``items``) and the dense
    deltas; every process writes the arrays it owns. Returns the complete step metadata."""
    arrays, meta = encode_step(local, dense)
    merged = {}
    for part in _allgather_json(meta["linears"]):
        merged.update(part)
    meta["linears"] = {name: merged[name] for name, *_ in items}
    meta["nbytes"] = int(sum(e["nbytes"] for e in meta["linears"].values())
                         + sum(e["nbytes"] for e in meta["dense"].values()))
    meta.update(extra_meta)
    owners = {("linears", name): _owner(step, j) for j, (name, *_) in enumerate(items)}
    owners.update({("dense", path): _owner(step, len(items) + k) for k, path in enumerate(dense)})
    store.save(step, owned_tree(arrays, meta, lambda kind, name: owners[kind, name], jax.process_index()), meta)
    return meta


# ----- calibration -------------------------------------------------------------------------------
def _calibration_ids(calib, ft: _Source, tokenizer_dir, seq_len, num_sequences):
    from prinmix_jax.models.calibration import tokenize_calibration

    tdir = tokenizer_dir if tokenizer_dir is not None else ft.path
    ids = tokenize_calibration(calib, tdir, seq_len=seq_len, num_sequences=num_sequences)
    prov = {"num_sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": int(ids.size),
            "ids_sha256": hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()}
    if isinstance(calib, (str, os.PathLike)):
        prov.update(source=os.path.basename(os.fspath(calib)), file_sha256=_file_sha256(os.fspath(calib)))
    else:
        prov["source"] = "in-memory ids"
    return ids, prov


# ----- the main entry point ----------------------------------------------------------------------
def _progress(enabled, total, initial, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def _dense_entry(delta: np.ndarray, mode: str, store_dtype: str):
    if not np.any(delta):
        return ("zero", delta.shape)
    if mode == "skip":
        return ("skip", delta.shape, float(np.max(np.abs(delta))))
    return ("store", delta.astype(store_dtype))


def compress_model(base, finetuned, out, *, calib=None, config: CompressionConfig | None = None,
                   method: str = "prinmix", calibration_mode: str = "parallel", policy: ParamPolicy | None = None,
                   seq_len: int = 128, num_sequences: int | None = None, tokenizer_dir=None, model_config=None,
                   mesh=None, scope: str | None = None, calib_chunk_size: int = 8, overwrite: bool = False,
                   progress: bool = False,
                   log: Callable[[str], None] | None = None, _stop_after_steps: int | None = None) -> dict:
    """Compresses ``finetuned − base`` into an Orbax delta checkpoint at ``out``.

    Args:
      base, finetuned: Hugging Face checkpoint folders (or ``CheckpointReader``\\ s, ``CausalLM`` models, or
        param trees with ``model_config``) of the same architecture and shapes.
      out: output folder. Work happens in ``out + ".partial"`` (an Orbax CheckpointManager, one step per
        finished block); it is renamed to ``out`` when complete. A killed run resumes from the last
        finished step when started again with the same inputs and settings.
      calib: calibration data: a ``.txt`` file, a ``.jsonl`` with ``"text"`` (tokenized with the fine-tuned
        checkpoint's tokenizer) or pre-tokenized ``"ids"``, a ``.npy``, or an int array ``(N, T)``. ``None``
        = data-free (identity Hessians).
      config: :class:`CompressionConfig` (budget ratio, widths, group size, ...).
      method: one of :data:`prinmix_jax.METHODS`.
      calibration_mode: ``"parallel"`` (Hessians from one streamed pass of the fine-tuned model) or
        ``"sequential"`` (block b sees hidden states from already-compressed blocks 0..b-1).
      policy: :class:`ParamPolicy` for norms, biases, embeddings and output head.
      seq_len, num_sequences: calibration windows (num_sequences=None: all complete windows).
      tokenizer_dir: tokenizer folder for text (default: the fine-tuned checkpoint folder).
      model_config: ``ModelConfig`` when base/finetuned are param trees.
      mesh: device mesh for the stacked SVD / error tables (default: every local device on one axis).
      scope: ``"matrix"`` (one ILP per matrix, each within its own budget) or ``"global"`` (PrinMix only:
        a first pass computes every block linear's error table, one ILP over all of them under the sum of
        their budgets — errors relative to each matrix's ``‖ΔW X‖²`` — then the blocks are compressed
        with those widths; needs parallel calibration or data-free). ``None`` (default): ``"global"`` for
        PrinMix with parallel calibration or data-free, which measured best on the SFT pair (README),
        ``"matrix"`` otherwise.
      calib_chunk_size: calibration sequences per jitted step.
      overwrite: replace an existing ``out``.
      progress: show a progress bar on stderr.
      log: optional callable receiving one-line status messages.

    Returns:
      The top-level metadata written to ``out/prinmix_delta.json`` (bytes, ratio, fingerprint, per-matrix
      info).

    Raises:
      FileExistsError: ``out`` exists and ``overwrite`` is false.
      IncompatibleModelsError: different architectures / shapes.
      FileNotFoundError, CheckpointError, CalibrationDataError, ValueError: bad inputs or settings.
      OSError: the output location is not writable.
    """
    from prinmix_jax.models import HESSIAN_FOR_LINEAR, LINEAR_NAMES
    from prinmix_jax.models.calibration import block_forward, block_forward_with_hessians, embed

    t_start = time.perf_counter()
    say = log or (lambda s: None)
    cfg = config if config is not None else CompressionConfig()
    if not isinstance(cfg, CompressionConfig):
        raise ValueError(f"config must be a CompressionConfig, got {type(cfg).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if calibration_mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration_mode must be one of {CALIBRATION_MODES}, got {calibration_mode!r}")
    if scope is None:
        sequential = calib is not None and calibration_mode == "sequential"
        scope = "global" if method == "prinmix" and not sequential else "matrix"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global" and method != "prinmix":
        raise ValueError(f"scope='global' allocates PrinMix widths; it does not apply to method {method!r}")
    if scope == "global" and calib is not None and calibration_mode == "sequential":
        raise ValueError("scope='global' needs every error table before any block is compressed, so it "
                         "cannot use sequential calibration; use calibration_mode='parallel'")
    pol = policy if policy is not None else ParamPolicy()
    inputs = [x for x in (base, finetuned, calib, tokenizer_dir) if isinstance(x, (str, os.PathLike))]
    out = check_output_location(out, overwrite, inputs)
    work = out + ".partial"
    for x in inputs:
        rx, rw = os.path.realpath(os.fspath(x)), os.path.realpath(work)
        if rx == rw or rx.startswith(rw + os.sep):
            raise ValueError(f"the input {os.fspath(x)!r} lies in {work!r}, the folder compress works in; "
                             "choose another output")

    base_src = _Source(base, model_config, "base")
    ft_src = _Source(finetuned, model_config, "fine-tuned")
    _check_compatible(base_src, ft_src)
    mcfg = ft_src.config
    block_table, global_table = param_groups(mcfg)
    check_settings(_budget_shapes(mcfg, pol), cfg, method, scope)
    ids, calib_prov = (None, None)
    if calib is not None:
        ids, calib_prov = _calibration_ids(calib, ft_src, tokenizer_dir, seq_len, num_sequences)
        calib_prov["mode"] = calibration_mode
    mesh = mesh if mesh is not None else _default_mesh()
    num_steps = mcfg.num_layers + 1

    identity = {"format_version": FORMAT_VERSION, "method": method, "scope": scope, "config": cfg.to_dict(),
                "policy": pol.to_dict(), "calibration": calib_prov, "base_header": base_src.header_digest(),
                "finetuned_header": ft_src.header_digest()}
    identity = json.loads(json.dumps(identity))
    primary = jax.process_index() == 0
    if primary:
        if os.path.isdir(work) and not os.path.islink(work):
            _reuse_or_discard(work, identity, base_src, ft_src, block_table, global_table, num_steps, say)
        elif os.path.lexists(work):
            raise FileExistsError(f"{work!r} exists and is not a folder prinmix made; remove it")
        os.makedirs(work, exist_ok=True)
        write_output_marker(work, "delta")
        hf_dst = os.path.join(work, HF_DIR)
        os.makedirs(hf_dst, exist_ok=True)
        if ft_src.path is not None:
            from prinmix_jax.models.hf_io import TOKENIZER_FILES

            for fname in ("config.json",) + TOKENIZER_FILES:
                src = os.path.join(ft_src.path, fname)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(hf_dst, fname))
        if not os.path.isfile(os.path.join(hf_dst, "config.json")):
            with open(os.path.join(hf_dst, "config.json"), "w", encoding="utf-8") as f:
                json.dump(mcfg.to_hf_dict(), f, indent=2, sort_keys=True)
    _barrier("prinmix-work-dir")
    _check_shared(work, out)
    store = StepStore(os.path.join(work, STEPS_DIR), identity)
    created_here = store.latest_step() is None
    try:
        widths = None
        if scope == "global":
            widths = _global_widths(base_src, ft_src, mcfg, block_table, ids, cfg, mesh, calib_chunk_size,
                                    progress and primary, say, HESSIAN_FOR_LINEAR, LINEAR_NAMES, embed,
                                    block_forward_with_hessians)
        wdigest = _widths_digest(widths)
        if not created_here and _broadcast_int(int(primary and store.restore_meta(0).get("widths_digest") != wdigest)):
            # Every step of a global allocation depends on every block's error table: the finished
            # steps were compressed with other widths, so they cannot be reused.
            say(f"discarding the finished steps in {work}: the global bit allocation differs from the unfinished "
                "run's (the weights changed); starting over")
            store = _restart_store(store, work, identity)
            created_here = True
        return _run(store, work, out, base_src, ft_src, mcfg, block_table, global_table, ids, calib_prov, cfg,
                    method, calibration_mode, pol, mesh, calib_chunk_size, overwrite, progress, say, widths,
                    identity, num_steps, t_start, _stop_after_steps, HESSIAN_FOR_LINEAR, LINEAR_NAMES,
                    embed, block_forward, block_forward_with_hessians, wdigest)
    except Exception:
        store.close()
        # Deterministic failures leave nothing behind when no step was finished by this run's start.
        if primary and created_here and os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        base_src.close()
        ft_src.close()


def _budget_shapes(mcfg, pol) -> dict:
    """``{"blocks": [(m, n) of every decoder-block linear], "globals": [(m, n) compressed outside]}``."""
    from prinmix_jax.models.llama.params import block_param_table, global_param_table

    blocks = [tuple(shape) for _, path, shape in block_param_table(mcfg)
              if len(shape) == 2 and path[-1] == "weight"] * mcfg.num_layers
    glob = [tuple(shape) for _, path, shape in global_param_table(mcfg)
            if len(shape) == 2 and getattr(pol, "embeddings" if path[0] == "embed_tokens" else "lm_head") == "compress"]
    return {"blocks": blocks, "globals": glob}


def _step_digests(step: int, base_src, ft_src, block_table, global_table) -> tuple[str, str]:
    """``(base digest, fine-tuned digest)`` of the tensors step ``step`` consumes (tensor_digest)."""
    table = global_table if step == 0 else block_table
    trees = (base_src.globals(), ft_src.globals()) if step == 0 else (base_src.block(step - 1),
                                                                      ft_src.block(step - 1))
    return tuple(tensor_digest([("/".join(p), _get(t, p)) for p, _ in table]) for t in trees)


def _reuse_or_discard(work, identity, base_src, ft_src, block_table, global_table, num_steps, say) -> None:
    """Keeps an unfinished run in ``work`` only if it was started with the same settings and every finished
    step's inputs (base and fine-tuned tensors, by content) are unchanged; else deletes it, if prinmix made it.
    """
    store, old = None, None
    try:
        store = StepStore(os.path.join(work, STEPS_DIR), read_only=True)
        old = store.run_identity()
    except Exception:
        pass
    if not os.path.isfile(os.path.join(work, OUTPUT_MARKER)) and old is None:
        raise FileExistsError(f"{work!r} exists but is not an unfinished prinmix run; remove it or choose "
                              "another output")
    reason = None
    if old != identity:
        reason = "it was started with other inputs or settings"
    else:
        for s in store.all_steps():
            if s >= num_steps:
                break
            meta = store.restore_meta(s)
            got = _step_digests(s, base_src, ft_src, block_table, global_table)
            for label, want, have in zip(("base", "fine-tuned"), (meta.get("base_digest"),
                                                                 meta.get("finetuned_digest")), got):
                if want != have:
                    where = "the embedding, final norm and head" if s == 0 else f"block {s - 1}"
                    reason = (f"the {label} weights of {where} differ from the ones it compressed "
                              "(same names, shapes and sizes, other values)")
                    break
            if reason:
                break
    if store is not None:
        store.close()
    if reason is None:
        say(f"resuming the unfinished run in {work}")
        return
    say(f"discarding {work}: {reason}; starting over")
    shutil.rmtree(work)


def _widths_digest(widths) -> str | None:
    if widths is None:
        return None
    h = hashlib.sha256()
    for (b, name), w in sorted(widths.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        h.update(f"{b}/{name}:".encode())
        h.update(np.ascontiguousarray(w, np.int32).tobytes())
    return h.hexdigest()


def _restart_store(store, work: str, identity: dict):
    store.close()
    steps = os.path.join(work, STEPS_DIR)
    if jax.process_index() == 0:
        shutil.rmtree(steps)
    _barrier("prinmix-restart")
    return StepStore(steps, identity)


def _check_shared(work: str, out: str) -> None:
    """Multi-process runs write one checkpoint together: every process must see the folder process 0 made.

    Raises on every process (so none is left waiting in a collective) when some do not.
    """
    if jax.process_count() == 1:
        return
    seen = _allgather_json(os.path.isfile(os.path.join(work, HF_DIR, "config.json")))
    if all(seen):
        return
    blind = [p for p, ok in enumerate(seen) if not ok]
    if jax.process_index() == 0 and not os.path.isdir(os.path.join(work, STEPS_DIR)):
        shutil.rmtree(work, ignore_errors=True)
    raise OSError(f"process(es) {blind} do not see {work!r}, which process 0 created: in a multi-process run "
                  f"the output {out!r} must be on storage every host shares (NFS/Filestore, a gcsfuse-mounted "
                  f"bucket) and every process must be given the same path")


def _global_widths(base_src, ft_src, mcfg, block_table, ids, cfg, mesh, chunk, progress, say, HESSIAN_FOR_LINEAR,
                   LINEAR_NAMES, embed, block_forward_with_hessians) -> dict:
    """First pass of the global scope: every block linear's error table, then one ILP.

    With several processes each computes the tables of the matrices it will compress (the same
    assignment as the second pass); the tables are gathered and process 0 solves the ILP and broadcasts
    the widths, so every process uses the same allocation.

    Returns:
      ``{(block, linear name): (r,) widths}`` (all-zero deltas are left out: they store nothing).
    """
    order = {n: i for i, n in enumerate(LINEAR_NAMES)}
    me = jax.process_index()
    mine = []
    h = None if ids is None else embed(ft_src.globals(), mcfg, ids)
    bar = _progress(progress, mcfg.num_layers, 0, "error tables")
    for b in range(mcfg.num_layers):
        base_b, ft_b = base_src.block(b), ft_src.block(b)
        hess = None
        if h is not None:
            h, hess = block_forward_with_hessians(ft_b, mcfg, h, layer=b, chunk_size=chunk)
        linears = sorted((path for path, kind in block_table if kind == "linear"), key=lambda p: order[p[-2]])
        groups = {}
        for j, path in enumerate(linears):
            if _owner(b + 1, j) != me:
                continue
            name = path[-2]
            d = np.asarray(_get(ft_b, path), np.float32) - np.asarray(_get(base_b, path), np.float32)
            if not np.any(d):
                continue
            hk = HESSIAN_FOR_LINEAR[name]
            hm = None if hess is None else np.asarray(hess[hk], np.float32)
            groups.setdefault((d.shape, hk), []).append((name, d, hm))
        for members in groups.values():
            hs = None if members[0][2] is None else [m[2] for m in members]
            for (name, d, _), e in zip(members, error_tables([m[1] for m in members], hs, cfg, mesh=mesh)):
                mine.append(([b, name, list(d.shape)], np.asarray(e)))
        del base_b, ft_b, groups
        bar.update(1)
    bar.close()
    tables = sorted(_allgather_arrays(mine), key=lambda kt: (kt[0][0], order[kt[0][1]]))
    keys = [(b, name) for (b, name, _), _ in tables]
    costs = [index_cost_bits(*shape, cfg.bits, cfg.group_size, scale_bits=cfg.scale_bits) for (_, _, shape), _ in tables]
    budget = sum(cfg.budget_bits(*shape) for (_, _, shape), _ in tables)
    sizes = [t.shape[0] for _, t in tables]
    flat = np.zeros(sum(sizes), np.int32)
    if me == 0 and tables:
        widths, alloc = allocate_bits_global([t for _, t in tables], costs, budget, cfg.bits, max_widths=cfg.max_widths,
                                             solver=cfg.solver, time_limit=cfg.time_limit, mip_rel_gap=cfg.ilp_gap)
        say(f"global allocation over {len(keys)} matrices: {alloc.cost_bits // 8} of {budget // 8} bytes, "
            f"{alloc.seconds:.1f} s ({alloc.solver})")
        flat = np.concatenate([np.asarray(w, np.int32) for w in widths])
    flat = _broadcast_array(flat)
    return dict(zip(keys, np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []))


def _run(store, work, out, base_src, ft_src, mcfg, block_table, global_table, ids, calib_prov, cfg, method,
         mode, pol, mesh, chunk, overwrite, progress, say, widths, identity, num_steps, t_start, stop_after,
         HESSIAN_FOR_LINEAR, LINEAR_NAMES, embed, block_forward, block_forward_with_hessians, wdigest=None):
    latest = store.latest_step()
    u_ranks = None
    if widths is not None:      # the largest kept rank of every linear over the model (see _compress_entries)
        u_ranks = {}
        for (_, name), w in widths.items():
            u_ranks[name] = max(u_ranks.get(name, 0), int(np.count_nonzero(w)))
    start = _broadcast_int(-1 if latest is None else latest) + 1
    if start > 0:
        say(f"{start} of {num_steps} steps already finished; resuming")
    bar = _progress(progress and jax.process_index() == 0, num_steps, start, "compress")
    h = None
    done_this_run = 0

    # --- step 0: globals ---
    base_g = base_src.globals()
    if start == 0:
        t0 = time.perf_counter()
        ft_g = ft_src.globals()
        items, dense = [], {}
        for path, kind in global_table:
            d = np.asarray(_get(ft_g, path), np.float32) - np.asarray(_get(base_g, path), np.float32)
            mode_k = getattr(pol, kind)
            if mode_k == "compress":
                items.append((path[0], d, None, "none"))
            else:
                dense["/".join(path)] = _dense_entry(d, mode_k, pol.store_dtype)
        entries = _compress_entries(items, cfg, method, mesh, 0)
        _save_step(store, 0, items, entries, dense, dict(
            step=0, block=None, seconds=time.perf_counter() - t0, widths_digest=wdigest,
            base_digest=tensor_digest([("/".join(p), _get(base_g, p)) for p, _ in global_table]),
            finetuned_digest=tensor_digest([("/".join(p), _get(ft_g, p)) for p, _ in global_table])))
        del ft_g, items, dense, entries
        bar.update(1)
        done_this_run += 1
    g_delta = None
    if ids is not None:
        if mode == "sequential":
            arrays, meta = store.restore(0)
            g_delta = decode_step(arrays, meta)
            h = embed(merge_block(base_g, g_delta, global_table), mcfg, ids)
        else:
            h = embed(ft_src.globals(), mcfg, ids)
    del base_g

    # --- steps 1..L: decoder blocks ---
    for b in range(mcfg.num_layers):
        step = b + 1
        if stop_after is not None and done_this_run >= stop_after:
            break
        if step < start:  # replay the calibration state through a finished block
            if h is not None:
                if mode == "parallel":
                    h, _ = block_forward_with_hessians(ft_src.block(b), mcfg, h, layer=b, chunk_size=chunk)
                else:
                    arrays, meta = store.restore(step)
                    merged = merge_block(base_src.block(b), decode_step(arrays, meta), block_table)
                    h = block_forward(merged, mcfg, h, layer=b, chunk_size=chunk)
            continue
        t0 = time.perf_counter()
        base_b, ft_b = base_src.block(b), ft_src.block(b)
        hess = None
        if h is not None:
            h_next, hess = block_forward_with_hessians(ft_b, mcfg, h, layer=b, chunk_size=chunk)
        items, dense = [], {}
        for path, kind in block_table:
            d = np.asarray(_get(ft_b, path), np.float32) - np.asarray(_get(base_b, path), np.float32)
            if kind == "linear":
                name = path[-2]
                hk = HESSIAN_FOR_LINEAR[name]
                items.append((name, d, None if hess is None else np.asarray(hess[hk], np.float32), hk))
            else:
                dense["/".join(path)] = _dense_entry(d, getattr(pol, kind), pol.store_dtype)
        order = {n: i for i, n in enumerate(LINEAR_NAMES)}
        items.sort(key=lambda it: order[it[0]])
        step_widths = None if widths is None else {n: w for (bb, n), w in widths.items() if bb == b}
        entries = _compress_entries(items, cfg, method, mesh, step, step_widths, u_ranks)
        _save_step(store, step, items, entries, dense, dict(
            step=step, block=b, seconds=time.perf_counter() - t0, widths_digest=wdigest,
            base_digest=tensor_digest([("/".join(p), _get(base_b, p)) for p, _ in block_table]),
            finetuned_digest=tensor_digest([("/".join(p), _get(ft_b, p)) for p, _ in block_table])))
        if h is not None:
            if mode == "parallel":
                h = h_next
            else:  # propagate through the compressed block, read back from the (shared) checkpoint
                merged = merge_block(base_b, decode_step(*store.restore(step)), block_table)
                h = block_forward(merged, mcfg, h, layer=b, chunk_size=chunk)
        del base_b, ft_b, items, dense, entries, hess
        bar.update(1)
        done_this_run += 1
    bar.close()
    if stop_after is not None and store.latest_step() != num_steps - 1:
        store.close()
        return {"stopped_after_steps": done_this_run}

    # --- finish: aggregate the metadata, publish atomically ---
    # every process reads the step metadata; process 0 writes the summary and publishes
    summary = _summary(store, num_steps, mcfg, cfg, method, pol, calib_prov, identity, base_src, ft_src,
                       time.perf_counter() - t_start)
    summary["problems"] = result_problems(summary)
    store.close()
    if jax.process_index() == 0:
        summary = write_summary(work, summary)
        publish(work, out, overwrite)
    _barrier("prinmix-published")
    return summary


def result_problems(summary: dict) -> list[str]:
    """Why a finished delta is useless or out of its bounds (an empty list when it is fine).

    The CLI exits with status 3 when this is not empty. Checked: every delta exactly zero (the fine-tuned
    model equals the base: nothing is stored); every nonzero matrix kept nothing (relative output error
    1, the budget was too small); non-finite recorded errors; bytes over the budget.

    Args:
      summary: the metadata :func:`compress_model` returns (``prinmix_delta.json``).
    """
    problems = []
    rows = summary.get("matrices", [])
    nonzero = [r for r in rows if r.get("kind") != "zero"]
    if summary["bytes"]["total"] == 0:
        problems.append("every delta is exactly zero: the fine-tuned model equals the base (0 bytes stored)")
    elif nonzero and all(r.get("rank") == 0 or (r.get("rel_output_error") or 0.0) >= 1.0 - 1e-6 for r in nonzero):
        problems.append(f"no matrix keeps any part of its delta (relative output error 1.0 in all {len(nonzero)}): "
                        f"the budget (ratio {summary['config']['ratio']:.4g}) is too small")
    bad = [r for r in nonzero if r.get("rel_output_error") is not None and not np.isfinite(r["rel_output_error"])]
    if bad:
        problems.append(f"{len(bad)} matrices have a non-finite recorded error, e.g. block {bad[0]['block']} "
                        f"{bad[0]['name']}")
    if not summary.get("within_budget", True):
        b = summary["bytes"]
        pooled = summary.get("scope") == "global"    # block linears share one budget
        over = [r for r in rows if r["nbytes"] > r["budget_bytes"] + (4 if r.get("method") == "bitdelta" else 0)
                and not (pooled and r["block"] is not None)]
        if not over:
            problems.append(f"over budget: the matrices take {b['linears']} bytes for a budget of "
                            f"{b['budget_bytes_linears']}")
        else:
            r = over[0]
            where = "outside the blocks" if r["block"] is None else f"block {r['block']}"
            problems.append(f"over budget: {len(over)} matrices exceed their own budget, e.g. {r['name']} in "
                            f"{where}: {r['nbytes']} bytes for {r['budget_bytes']}")
    return problems


def _summary(store, num_steps, mcfg, cfg, method, pol, calib_prov, identity, base_src, ft_src, seconds) -> dict:
    from prinmix_jax.models.llama.params import expected_tensors

    digests, rows, totals = [], [], {"linears": 0, "dense": 0, "globals": 0, "blocks": 0}
    budget_bytes_total, within = 0, True
    lin_params = 0
    for s in range(num_steps):
        meta = store.restore_meta(s)
        digests.append(meta["base_digest"])
        for name, e in meta["linears"].items():
            shape = e["state"]["shape"] if e["kind"] == "matrix" else e["shape"]
            m, n = int(shape[0]), int(shape[1])
            budget = cfg.budget_bits(m, n) // 8
            info = e.get("info", {})
            row = {"step": s, "block": meta["block"], "name": name, "kind": e["kind"], "shape": [m, n],
                   "method": e["state"]["method"] if e["kind"] == "matrix" else None, "nbytes": e["nbytes"],
                   "budget_bytes": budget, "ratio": e["nbytes"] / (2 * m * n)}
            row.update({k: info[k] for k in ("rel_output_error", "rank", "widths", "seconds") if k in info})
            rows.append(row)
            totals["linears"] += e["nbytes"]
            budget_bytes_total += budget
            # BitDelta's one float32 scale per matrix is not counted against its 1 bit/param
            slack = 4 if row["method"] == "bitdelta" else 0
            if s == 0 or identity.get("scope") != "global":   # global scope: one budget for all blocks
                within &= e["nbytes"] <= budget + slack
            if s > 0:
                lin_params += m * n
        totals["dense"] += sum(e["nbytes"] for e in meta["dense"].values())
        totals["globals" if s == 0 else "blocks"] += meta["nbytes"]
    totals["total"] = totals["globals"] + totals["blocks"]
    n_params = sum(int(np.prod(shape)) for _, shape in expected_tensors(mcfg).values())
    block_lin_bytes = sum(r["nbytes"] for r in rows if r["step"] > 0)
    within &= block_lin_bytes <= sum(r["budget_bytes"] + (4 if r["method"] == "bitdelta" else 0)
                                     for r in rows if r["step"] > 0)
    hf = json.loads(mcfg.hf_config_json) if mcfg.hf_config_json else mcfg.to_hf_dict()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "method": method, "scope": identity.get("scope", "matrix"), "config": cfg.to_dict(), "policy": pol.to_dict(),
        "calibration": calib_prov,
        "model": {"architecture": mcfg.architecture, "model_type": mcfg.model_type, "num_blocks": mcfg.num_layers,
                  "num_params": n_params, "block_linear_params": lin_params, "hf_config": hf},
        "base": {"fingerprint": combine_fingerprint(digests), "step_digests": digests,
                 "path": base_src.path, "header_digest": identity["base_header"]},
        "finetuned": {"path": ft_src.path, "header_digest": identity["finetuned_header"]},
        "num_steps": num_steps,
        "bytes": dict(totals, budget_bytes_linears=budget_bytes_total, dense_16bit_delta=2 * n_params),
        "ratio": totals["total"] / (2 * n_params),
        "ratio_block_linears": block_lin_bytes / (2 * lin_params) if lin_params else 0.0,
        "bits_per_param": 8 * totals["total"] / n_params,
        "within_budget": bool(within),
        "budget_scope": "block linears together" if identity.get("scope") == "global" else "each matrix",
        "matrices": rows,
        "run": {"seconds": seconds, "process_count": jax.process_count(), "device_count": jax.device_count(),
                "platform": jax.devices()[0].platform},
    }
