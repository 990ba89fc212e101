"""``prinmix compress`` on 7B-shaped checkpoints: per-stage time, peak memory, bytes (a benchmark, not a test).

For each model shape (Llama-2-7B, Llama-3-8B, Qwen2.5-7B) a synthetic (base, fine-tuned) pair is written
like a Hub checkpoint (bf16 ``model-0000k-of-0000n.safetensors`` shards, ``model.safetensors.index.json``,
a ``config.json`` that ``transformers.AutoConfig`` reads; no tokenizer), ``--layers L`` decoder blocks deep,
then ``prinmix compress`` runs in a fresh child process, data-free and with calibration token ids (a
``.npy`` file). Printed: wall time, per-stage times, peak host RSS of the child, peak device memory (where
the backend reports it), bytes and ratio, and a projection to the full depth. ``--out-json`` keeps it all;
the Markdown tables are ready for docs/benchmarks.md.

    python benchmarks/bench_scale.py                                    # 1 layer, the three shapes
    python benchmarks/bench_scale.py --shapes-scale 0.125 --layers 1    # smoke run (about a minute a model)
    python benchmarks/bench_scale.py --models llama2 --modes data-free --layers 32 --out-json scale.json
    python benchmarks/bench_scale.py --models path/to/Mistral-7B/config.json --layers 2   # your model's shapes

The pair
    Every tensor is generated, rounded to bf16 and written one at a time (large ones in row chunks): host
    memory stays bounded (a 128256 x 4096 embedding is 1 GB in bf16). Base weights ~ N(0, 0.02²) (norms
    1 + noise). The fine-tuning delta of every matrix is ``U diag(s) Vᵀ + noise`` in float32 with
    ``s_i ∝ i^-decay`` over ``rank = min(m, n) // 8`` (at most 512) indices and the dense noise carrying
    ``--noise`` of the delta's energy, scaled to ``--delta-rel`` (default 1e-3) of the weight's norm; then
    ``W_ft = bf16(W_base + Δ)``. bf16 has an 8-bit significand, so the rounding adds white noise of about
    1e-3 of the weight norm itself: the delta that survives (``W_ft − W_base``, what prinmix sees) is
    measured on block 0 and printed (its norm relative to the weight, and the share of its energy in the
    planted singular subspace; a white delta would put ``rank / n`` there).

Per-stage times
    The child is ``prinmix compress`` (the CLI, unchanged) with timers wrapped around library functions by
    this script (nothing in the library is edited): read (``ModelSource.block_tensor/block/globals``:
    safetensors -> float32), deltas (``block_deltas``: FT − base and the step digests, one tensor at a
    time), calibration (tokenizing, ``embed``,
    ``block_forward_with_hessians``), SVD (``stack_svd``), error tables (``stack_tables``: the V-side
    GPTQ passes at every width), V step at given widths (``fixed_width_rows``, the global scope's
    second pass), ILP (``allocate_bits`` / ``allocate_bits_global``), RTC + U step (``svd_quant`` less
    packing), packing (``pack_svd``), write (``save_step``, summary, publishing), other (the rest of the
    wall time: interpreter start, imports, JAX start-up, checks, the step loop's own work). Times are
    exclusive (a stage nested in another is not counted twice) and include XLA compilation, which is
    also reported on its own (``jax.monitoring`` compile events). To make device work land in the stage
    that launched it, the wrappers wait for their results (``block_until_ready``) and the library's
    ``run_sharded`` is made blocking; the pipeline consumes every result on the host right after, so this
    moves time between stages more than it adds any. ``--plain`` runs the bare CLI instead (wall time,
    memory and bytes only).

Projection to the full depth
    ``once + compile + (L_full / L) · per_block``: ``once`` = the globals step (embedding, head), start-up,
    calibration embedding and the summary; ``compile`` = XLA compile time (programs compile once per
    shape, not per block); ``per_block`` = the rest. The global ILP grows with the number of matrices
    (counted linearly here; benchmarks/bench_ilp.py measures the whole-7B allocation). Bytes: the globals
    once plus the blocks' bytes per block. Peak RSS does not grow with depth (blocks are streamed;
    benchmarks/bench_memory.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import numpy as np

#: The checkout this script belongs to: its ``prinmix_jax`` is the one measured, here and in the ``prinmix
#: compress`` child (a child started with ``-c`` would otherwise find the package in its working directory
#: first: running an older checkout's copy of this script from a newer checkout measured the newer code).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# ----------------------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------------------
#: The exact shapes of the three models (their Hub config.json values).
MODELS = {
    "llama2": dict(title="Llama-2-7B", model_type="llama", architecture="LlamaForCausalLM", hidden=4096,
                   inter=11008, vocab=32000, layers=32, heads=32, kv_heads=32, qkv_bias=False, rope_theta=10000.0,
                   max_pos=4096, eps=1e-5),
    "llama3": dict(title="Llama-3-8B", model_type="llama", architecture="LlamaForCausalLM", hidden=4096,
                   inter=14336, vocab=128256, layers=32, heads=32, kv_heads=8, qkv_bias=False, rope_theta=500000.0,
                   max_pos=8192, eps=1e-5),
    "qwen25": dict(title="Qwen2.5-7B", model_type="qwen2", architecture="Qwen2ForCausalLM", hidden=3584,
                   inter=18944, vocab=152064, layers=28, heads=28, kv_heads=4, qkv_bias=True, rope_theta=1000000.0,
                   max_pos=131072, eps=1e-6),
}


def scaled_spec(key: str, scale: float = 1.0, layers: int = 1) -> dict:
    """The shapes of model ``key`` with every dimension scaled by ``scale``, ``layers`` blocks deep.

    ``key`` is one of :data:`MODELS` or the path of a Hub ``config.json`` (or of a folder holding one) of any
    architecture ``prinmix_jax.models`` reads (Llama, Mistral, Qwen2, Qwen3): the pair then has that model's
    shapes, biases, q/k norms, tied embeddings and the rest of its config.

    The head structure stays valid: the numbers of query and key/value heads are kept (so MHA / GQA 8 /
    GQA 4 stay what they are) and the head dimension is scaled (even, at least 2, for RoPE); hidden =
    heads · head_dim where the model has it so (otherwise hidden is scaled on its own, a multiple of 8).
    Intermediate size is rounded to a multiple of 8, vocab to an integer (at least 64).
    """
    base = dict(MODELS[key]) if key in MODELS else _spec_from_config(key)
    s = dict(base, key=key, layers_full=base["layers"], layers=layers, scale=scale)
    head_dim = s.get("head_dim") or s["hidden"] // s["heads"]
    if scale != 1.0:
        square = s["hidden"] == s["heads"] * head_dim
        head_dim = max(2, 2 * round(head_dim * scale / 2))
        s["hidden"] = s["heads"] * head_dim if square else max(8, 8 * round(s["hidden"] * scale / 8))
        s["inter"] = max(8, 8 * round(s["inter"] * scale / 8))
        s["vocab"] = max(64, round(s["vocab"] * scale))
    s["head_dim"] = head_dim
    return s


def _spec_from_config(path: str) -> dict:
    """A :data:`MODELS`-style entry from a config.json (checked by ``prinmix_jax.models.ModelConfig``)."""
    from prinmix_jax.models import ModelConfig

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} is neither one of the built-in models ({', '.join(MODELS)}) nor a config.json "
                         "(or a folder holding one)")
    with open(file, encoding="utf-8") as f:
        d = json.load(f)
    cfg = ModelConfig.from_hf_config(d, source=file)      # unsupported architectures fail here, by name
    title = d.get("_name_or_path") or (os.path.basename(os.path.dirname(os.path.abspath(file)))
                                       if os.path.basename(file) == "config.json"
                                       else os.path.splitext(os.path.basename(file))[0])
    return dict(title=os.path.basename(str(title).rstrip("/")) or "model", model_type=cfg.model_type,
                architecture=cfg.architecture, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                vocab=cfg.vocab_size, layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias, hf=d)


def hf_config(spec: dict) -> dict:
    """A config.json as the Hub has it for the model (with the spec's shapes and depth)."""
    if "hf" in spec:      # the user's config.json, with this spec's shapes and depth written over it
        cfg = dict(spec["hf"], vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                   intermediate_size=spec["inter"], num_hidden_layers=spec["layers"],
                   num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                   head_dim=spec["head_dim"])
        cfg["dtype" if "dtype" in cfg else "torch_dtype"] = "bfloat16"
        cfg.pop("quantization_config", None)
        if isinstance(cfg.get("layer_types"), list) and cfg["layer_types"]:
            types = cfg["layer_types"]
            cfg["layer_types"] = [types[i % len(types)] for i in range(spec["layers"])]
        if isinstance(cfg.get("max_window_layers"), int):
            cfg["max_window_layers"] = min(cfg["max_window_layers"], spec["layers"])
        return cfg
    cfg = {"architectures": [spec["architecture"]], "model_type": spec["model_type"], "vocab_size": spec["vocab"],
           "hidden_size": spec["hidden"], "intermediate_size": spec["inter"], "num_hidden_layers": spec["layers"],
           "num_attention_heads": spec["heads"], "num_key_value_heads": spec["kv_heads"],
           "max_position_embeddings": spec["max_pos"], "rms_norm_eps": spec["eps"], "rope_theta": spec["rope_theta"],
           "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "use_cache": True, "bos_token_id": 1, "eos_token_id": 2}
    if spec["model_type"] == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, rope_scaling=None, pretraining_tp=1)
    else:   # Qwen2.5-7B
        cfg.update(use_sliding_window=False, sliding_window=spec["max_pos"], max_window_layers=spec["layers"],
                   attention_dropout=0.0)
    return cfg


def model_config(spec: dict):
    """The ``prinmix_jax.models.ModelConfig`` of the written pair (what ``prinmix compress`` will read)."""
    from prinmix_jax.models import ModelConfig

    return ModelConfig.from_hf_config(hf_config(spec), source=f"{spec['title']} (bench_scale)")


def tensor_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``[(HF name, shape)]`` of every tensor of the model, in the order written (the library's own key map,
    ``prinmix_jax.models.llama.params``: embedding, the blocks in order, final norm, head unless tied)."""
    from prinmix_jax.models.llama.params import block_param_table, global_param_table

    cfg = model_config(spec)
    glob = [(name, tuple(shape)) for name, _, shape in global_param_table(cfg)]
    out = glob[:1]
    for b in range(cfg.num_layers):
        out += [(f"model.layers.{b}.{suffix}", tuple(shape)) for suffix, _, shape in block_param_table(cfg)]
    return out + glob[1:]


# ----------------------------------------------------------------------------------------------------------
# Streaming bf16 safetensors writer
# ----------------------------------------------------------------------------------------------------------
def plan_shards(shapes, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards of at most ``shard_bytes`` bf16 bytes (a larger tensor gets its own)."""
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        nb = 2 * math.prod(shape)
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    if cur:
        shards.append(cur)
    return shards


class _ShardFile:
    """One safetensors file written tensor by tensor: the header (every shape is known in advance) first,
    then each tensor's bytes as they are produced."""

    def __init__(self, path: str, tensors):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors:
            nb = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.expected, self.written = off, 0

    def write(self, arr_bf16: np.ndarray) -> None:
        b = np.ascontiguousarray(arr_bf16).tobytes()
        self.f.write(b)
        self.written += len(b)

    def close(self) -> None:
        self.f.close()
        if self.written != self.expected:
            raise RuntimeError(f"shard wrote {self.written} bytes, expected {self.expected}")


def _rng(seed: int, name: str, salt: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(salt.encode())])


def _tensor_pair_chunks(name, shape, *, seed, delta_rel, decay, noise, rows_per_chunk, stats):
    """Yields ``(base bf16 rows, fine-tuned bf16 rows)`` chunks of one tensor; records survival stats of
    the delta into ``stats`` (a dict) when it is not None."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    if len(shape) == 1:
        rng = _rng(seed, name, "w")
        w = (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
             else 0.1 * rng.standard_normal(shape)).astype(bf16)
        d = (delta_rel * float(np.linalg.norm(w.astype(np.float32))) / math.sqrt(shape[0])
             * rng.standard_normal(shape)).astype(np.float32)
        yield w, (w.astype(np.float32) + d).astype(bf16)
        return
    m, n = shape
    std_w = 0.02
    r = max(1, min(min(m, n) // 8, 512))
    s = np.arange(1, r + 1, dtype=np.float64) ** -decay
    # ||U diag(s) Vᵀ||² ≈ Σ s² (columns of U, rows of Vᵀ ~ unit norm); the noise takes `noise` of the energy
    target = (delta_rel * std_w * math.sqrt(m * n)) ** 2
    s *= math.sqrt((1 - noise) * target / np.sum(s ** 2))
    noise_std = math.sqrt(noise * target / (m * n))
    vt = (_rng(seed, name, "v").standard_normal((r, n)) / math.sqrt(n)).astype(np.float32)
    svt = (s[:, None] * vt).astype(np.float32)
    q = np.linalg.qr(vt.T.astype(np.float64))[0].astype(np.float32) if stats is not None else None
    acc = dict(w=0.0, d=0.0, ds=0.0, err=0.0, d_in=0.0, ds_in=0.0)
    for c, start in enumerate(range(0, m, rows_per_chunk)):
        k = min(rows_per_chunk, m - start)
        rng = _rng(seed, name, f"chunk{c}")
        w = (std_w * rng.standard_normal((k, n), dtype=np.float32)).astype(bf16)
        u = rng.standard_normal((k, r), dtype=np.float32) / np.float32(math.sqrt(m))
        d = u @ svt + np.float32(noise_std) * rng.standard_normal((k, n), dtype=np.float32)
        w32 = w.astype(np.float32)
        ft = (w32 + d).astype(bf16)
        if stats is not None:
            ds = ft.astype(np.float32) - w32            # the delta that survives bf16 rounding
            acc["w"] += float(np.sum(w32 * w32, dtype=np.float64))
            acc["d"] += float(np.sum(d * d, dtype=np.float64))
            acc["ds"] += float(np.sum(ds * ds, dtype=np.float64))
            acc["err"] += float(np.sum((ds - d) ** 2, dtype=np.float64))
            acc["d_in"] += float(np.sum((d @ q) ** 2, dtype=np.float64))
            acc["ds_in"] += float(np.sum((ds @ q) ** 2, dtype=np.float64))
            if m * n <= 2048 * 2048 and m <= rows_per_chunk:   # whole matrix in one chunk: its spectrum
                for tag, x in (("intended", d), ("survived", ds)):
                    sv = np.linalg.svd(x.astype(np.float64), compute_uv=False) ** 2
                    top = max(1, len(sv) // 10)
                    stats[f"top10pct_energy_{tag}"] = float(sv[:top].sum() / sv.sum())
        yield w, ft
    if stats is not None:
        stats.update(shape=[m, n], planted_rank=r, rel_norm_intended=math.sqrt(acc["d"] / acc["w"]),
                     rel_norm_survived=math.sqrt(acc["ds"] / acc["w"]),
                     rounding_rel_to_delta=math.sqrt(acc["err"] / acc["d"]),
                     planted_share_intended=acc["d_in"] / acc["d"], planted_share_survived=acc["ds_in"] / acc["ds"],
                     planted_share_white=r / n)


def _write_shard(dirs: dict, fname: str, tensors, *, seed, delta_rel, decay, noise, chunk_bytes) -> dict:
    """Writes one shard file of both models (``dirs``: {"base", "ft"} folders); returns the delta stats of its
    block-0 matrices. Every tensor's values depend on its name and the seed alone, never on which process
    writes it or in which order."""
    files = {k: _ShardFile(os.path.join(d, fname), tensors) for k, d in dirs.items()}
    stats = {}
    for name, shape in tensors:
        st = {} if (".layers.0." in name and len(shape) == 2) else None
        rows = max(1, chunk_bytes // (4 * shape[-1])) if len(shape) == 2 else 1
        for wb, wf in _tensor_pair_chunks(name, shape, seed=seed, delta_rel=delta_rel, decay=decay, noise=noise,
                                          rows_per_chunk=rows, stats=st):
            files["base"].write(wb)
            files["ft"].write(wf)
        if st:
            stats[name.split(".")[-2]] = st
    for f in files.values():
        f.close()
    return stats


@contextlib.contextmanager
def _environ(**values):
    """``os.environ`` with ``values`` set (for processes started inside), restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_pair(root: str, spec: dict, *, seed: int = 0, delta_rel: float = 1e-3, decay: float = 0.6,
               noise: float = 0.25, shard_bytes: int | None = None, chunk_bytes: int = 64 << 20,
               jobs: int = 1) -> dict:
    """Writes ``root/base`` and ``root/ft`` (bf16 shards + index + config.json) for ``spec``, streaming.

    ``jobs`` > 1 writes that many shards at once, each in its own process (the same bytes as ``jobs=1``; a
    full-depth 7B pair is ~7 shards per model, several minutes in one process). Returns ``{"base", "ft",
    "seconds", "num_params", "bytes_per_model", "num_shards", "delta_stats"}`` (``delta_stats``: per block-0
    matrix, what of the delta survives bf16 rounding).
    """
    shapes = tensor_shapes(spec)
    if shard_bytes is None:   # as many shards as a Hub checkpoint of that size (5 GB each), at any scale
        shard_bytes = max(1 << 16, int(2e9 * spec["scale"] ** 2))
    shards = plan_shards(shapes, shard_bytes)
    t0 = time.perf_counter()
    dirs = {k: os.path.join(root, k) for k in ("base", "ft")}
    total = len(shards)
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hf_config(spec), f, indent=2)
    fnames = [f"model-{j + 1:05d}-of-{total:05d}.safetensors" for j in range(total)]
    write = functools.partial(_write_shard, dirs, seed=seed, delta_rel=delta_rel, decay=decay, noise=noise,
                              chunk_bytes=chunk_bytes)
    if jobs > 1 and total > 1:
        import concurrent.futures
        import multiprocessing

        # spawn, not fork: the parent may hold JAX or BLAS threads, which a forked child must not inherit. One
        # BLAS thread per writer: the processes already fill the cores, and each one's default pool of a thread
        # per core (16 x 16 on the H200's host) only contends (2 writers on 2 cores: 27-29 s -> 21-23 s)
        with _environ(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), \
                concurrent.futures.ProcessPoolExecutor(min(jobs, total),
                                                       mp_context=multiprocessing.get_context("spawn")) as ex:
            shard_stats = list(ex.map(write, fnames, shards))
    else:
        shard_stats = list(map(write, fnames, shards))
    stats = {k: v for st in shard_stats for k, v in st.items()}
    weight_map = {name: fname for fname, tensors in zip(fnames, shards) for name, _ in tensors}
    nbytes = sum(2 * math.prod(s) for _, s in shapes)
    for d in dirs.values():
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": nbytes}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return {"base": dirs["base"], "ft": dirs["ft"], "seconds": time.perf_counter() - t0,
            "num_params": sum(math.prod(s) for _, s in shapes), "bytes_per_model": nbytes, "num_shards": total,
            "delta_stats": stats}


# ----------------------------------------------------------------------------------------------------------
# The instrumented child: `prinmix compress` with timers around library functions
# ----------------------------------------------------------------------------------------------------------
STAGES = ("read", "deltas", "calibration", "svd", "error_tables", "v_step_given_widths", "ilp", "rtc_u", "packing",
          "write", "compress_other")
STAGE_TITLES = {"read": "read", "deltas": "deltas", "calibration": "calibration", "svd": "SVD",
                "error_tables": "error tables", "v_step_given_widths": "V step (given widths)", "ilp": "ILP",
                "rtc_u": "RTC + U step", "packing": "packing", "write": "write", "compress_other": "compress (rest)",
                "other": "other"}


class _Timers:
    def __init__(self):
        self.stack = []            # [start, children seconds]
        self.seconds = {}          # (scope, stage) -> exclusive seconds
        self.calls = {}
        self.scope = "block"
        self.compile = {"block": 0.0, "once": 0.0}
        self.compile_events = {}
        self.peak_stage = None
        self.overlapped = {}       # stage -> seconds spent in other threads (not part of the wall time split)
        self.lock = threading.Lock()
        self.runtime_rss = None    # bytes held before the first tensor is read (see measure_runtime)
        self.runtime_breakdown = None
        self.peak_breakdown = None  # (stage, scope, peak bytes, current bytes by kind) where the peak last rose

    def measure_runtime(self) -> None:
        """The process's RSS once the CLI has set JAX up and JAX's backend runs its first programs, before any
        tensor is read: Python, the imports, the backend's runtime and libraries (on a GPU: the driver,
        cuBLAS/cuSOLVER, XLA's GPU compiler), the compile of a few small programs. Called at the first
        wrapped library call, so the CLI's own JAX settings (XLA flags, compile cache) come first."""
        import jax
        import jax.numpy as jnp

        x = jnp.eye(128, dtype=jnp.float32) + jnp.ones((128, 128), jnp.float32)
        jax.block_until_ready((x @ x.T, jnp.linalg.eigh(x)[0], jnp.linalg.qr(x)[0], jnp.linalg.svd(x)[1]))
        self.runtime_rss = _current_rss()
        self.runtime_breakdown = rss_breakdown()
        if self.runtime_breakdown:        # in the log too: a run stopped by a time limit writes no JSON
            print(f"[memory] before the first read: {_kinds(self.runtime_breakdown)}", file=sys.stderr, flush=True)

    def wrap(self, owner, attr: str, stage: str | None, *, block: bool = False, scope: str | None = None):
        import functools

        import jax

        if not hasattr(owner, attr):
            self.seconds.setdefault(("missing", f"{getattr(owner, '__name__', owner)}.{attr}"), 0.0)
            return
        fn = getattr(owner, attr)
        timers = self

        @functools.wraps(fn)
        def timed(*a, **k):
            if threading.current_thread() is not threading.main_thread():
                # work overlapped with the main thread's (blocks read ahead, U steps on other devices): timed
                # on its own, outside the stages that add up to the wall time
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    key = stage or attr
                    with timers.lock:
                        timers.overlapped[key] = timers.overlapped.get(key, 0.0) + time.perf_counter() - t
            if timers.runtime_rss is None:
                timers.measure_runtime()
            prev = timers.scope
            if scope is not None:
                timers.scope = scope
            timers.stack.append([time.perf_counter(), 0.0])
            peak0 = _maxrss()
            try:
                out = fn(*a, **k)
                if block:
                    jax.block_until_ready(out)
                return out
            finally:
                start, children = timers.stack.pop()
                elapsed = time.perf_counter() - start
                peak1 = _maxrss()
                if peak1 > peak0 and (timers.peak_stage is None or peak1 > timers.peak_stage[2]):
                    # the innermost stage that raised the peak owns it (outer ones see the same peak)
                    timers.peak_stage = (stage or attr, timers.scope, peak1)
                    if timers.peak_breakdown is None or peak1 > timers.peak_breakdown[2] + (128 << 20):
                        # what the memory is, just after the stage that raised the peak (read every 128 MB of
                        # new peak: /proc/self/smaps lists every mapping)
                        timers.peak_breakdown = (stage or attr, timers.scope, peak1, rss_breakdown(),
                                                 device_array_bytes())
                        if timers.peak_breakdown[3]:
                            print(f"[memory] peak {peak1 / 1e9:.2f} GB after {timers.scope}/{stage or attr}: "
                                  f"{_kinds(timers.peak_breakdown[3])}; JAX: "
                                  + ", ".join(f"{k} {_gb(v)}" for k, v in timers.peak_breakdown[4].items()),
                                  file=sys.stderr, flush=True)
                if "." not in (stage or attr):     # sub-stages ("rtc_u.target") only in the JSON and tables
                    print(f"[stage] {timers.scope}/{stage or attr} {elapsed:.1f} s, peak RSS {peak1 / 1e9:.2f} GB",
                          file=sys.stderr, flush=True)
                if stage is not None:
                    key = (timers.scope, stage)
                    timers.seconds[key] = timers.seconds.get(key, 0.0) + elapsed - children
                    timers.calls[key] = timers.calls.get(key, 0) + 1
                    if timers.stack:
                        timers.stack[-1][1] += elapsed
                elif timers.stack:          # a scope marker: its time belongs to its stages
                    timers.stack[-1][1] += children
                timers.scope = prev
        setattr(owner, attr, timed)

    def on_event(self, event: str, duration: float, **_):
        # tracing, lowering to MLIR and XLA's backend compile (jax/_src/dispatch.py event names)
        if event.startswith("/jax/core/compile/") or "compil" in event:
            self.compile_events[event] = self.compile_events.get(event, 0.0) + duration
            if event.startswith("/jax/core/compile/") and event.endswith("_duration"):
                self.compile[self.scope if self.scope == "once" else "block"] += duration


def _current_rss() -> int:
    """This process's resident set now, bytes (``VmRSS``; the peak so far where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss()


def rss_breakdown() -> dict | None:
    """This process's resident memory now, bytes, by kind of mapping (``/proc/self/smaps``): ``anonymous``
    (the heap: arrays, Python objects, malloc arenas, thread stacks), ``libraries`` (shared objects: Python's,
    BLAS, XLA, an accelerator's runtime), ``checkpoint files`` (mapped safetensors pages) and ``other files``.
    None where ``/proc`` is missing."""
    out = dict.fromkeys(("anonymous", "libraries", "checkpoint files", "other files"), 0)
    kind = "anonymous"
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                if line.startswith("Rss:"):
                    out[kind] += int(line.split()[1]) * 1024
                    continue
                head = line.split(maxsplit=5)
                if head and not head[0].endswith(":") and "-" in head[0]:      # a mapping's header line
                    path = head[5].strip() if len(head) > 5 else ""
                    name = os.path.basename(path.split(" (deleted)")[0])
                    kind = ("anonymous" if not path or path.startswith("[")
                            else "libraries" if ".so" in name
                            else "checkpoint files" if name.endswith(".safetensors") else "other files")
    except OSError:
        return None
    return out


def device_array_bytes() -> dict:
    """Bytes of the live JAX arrays (on a CPU backend they are host memory, part of ``anonymous``; on an
    accelerator they are not) and of the host copies the accelerator's arrays keep once converted to NumPy
    (``np.asarray`` of a GPU/TPU array caches its copy on the array for as long as the array lives; on the
    CPU the conversion aliases the buffer and caches nothing)."""
    import jax

    live = cached = 0
    for a in jax.live_arrays():
        try:
            live += a.nbytes
            npy = getattr(a, "_npy_value", None)         # jax.Array's cache of its host copy (private)
            cached += 0 if npy is None else npy.nbytes
        except Exception:       # noqa: BLE001 (a deleted or donated array)
            continue
    return {"live arrays": live, "host copies of device arrays": cached}


def _maxrss() -> int:
    """This process's peak RSS so far, bytes (Linux ``ru_maxrss`` is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _install(timers: _Timers) -> None:
    import jax

    import prinmix_jax.compress as cp
    import prinmix_jax.core.mesh as mesh_mod
    import prinmix_jax.methods.prinmix as pm
    import prinmix_jax.methods.shared as sh
    import prinmix_jax.methods.v_step as vs
    import prinmix_jax.pipeline as pl
    import prinmix_jax.run as run
    import prinmix_jax.sources as src

    jax.monitoring.register_event_duration_secs_listener(timers.on_event)
    # device work lands in the stage that launched it
    blocking = lambda f: (lambda *a, **k: jax.block_until_ready(f(*a, **k)))  # noqa: E731
    for mod in (sh, pm):
        if hasattr(mod, "run_sharded"):
            mod.run_sharded = blocking(mesh_mod.run_sharded)
    w = timers.wrap
    # the parts of a run that do not repeat per block
    w(run, "_compress_globals", None, scope="once")
    w(run, "_first_hidden", None, scope="once")
    w(run, "_finish", None, scope="once")
    w(pl, "_calibration_ids", None, scope="once")
    w(src.ModelSource, "globals", "read", scope="once")
    w(src.ModelSource, "global_tensor", "read", scope="once")
    w(run, "global_deltas", "deltas", scope="once")
    w(src.ModelSource, "block", "read")
    # a block is read one tensor at a time by block_deltas (reads, digests, deltas): the reads are its
    # sub-stage, so that "deltas" keeps the subtraction and the digests
    w(src.ModelSource, "block_tensor", "read.tensor")
    w(src.ModelSource, "header_digest", "read", scope="once")
    for mod in (run, pl):
        w(mod, "block_deltas", "deltas")
    for mod in (run, pl):
        w(mod, "block_forward_with_hessians", "calibration", block=True)
        w(mod, "embed", "calibration", block=True, scope="once")
    w(run, "block_forward", "calibration", block=True)
    w(pl, "tokenize_calibration", "calibration", scope="once")
    for mod in (pm, cp):
        w(mod, "stack_svd", "svd", block=True)
        w(mod, "stack_tables", "error_tables", block=True)
    w(pm, "fixed_width_rows", "v_step_given_widths")
    w(pm, "allocate_bits", "ilp")
    w(pl, "allocate_bits_global", "ilp")
    w(sh, "svd_quant", "rtc_u", block=True)
    # The RTC + U step by part, each waited for (sub-stages roll up into the rtc_u column; what is left in
    # rtc_u itself is host work at the kept rank, the transfers back and dispatch): on the first H200 run the
    # step took ~0.6 s a matrix against ~0.02 s of kernels measured on an H100, with nothing to say where.
    w(sh, "padded_u_inputs", "rtc_u.inputs")
    w(sh, "h_times_vt", "rtc_u.hv", block=True)
    w(sh, "rtc_target", "rtc_u.target", block=True)
    w(sh, "u_hessian", "rtc_u.hessian", block=True)
    w(sh, "gptq_quantize", "rtc_u.gptq", block=True)
    w(sh, "delta_times_h", "rtc_u.dh", block=True)
    w(sh, "refit_sigma", "rtc_u.refit", block=True)
    w(sh, "_factored_error_terms", "rtc_u.error", block=True)
    # the V step's GPTQ passes at given widths, waited for where they are launched (fixed_width_rows returns
    # before the device is done, so without this their time landed in a later stage)
    w(vs, "stack_rows", "v_step_given_widths", block=True)
    w(sh, "pack_svd", "packing", block=True)
    w(run, "save_step", "write")
    w(run, "build_summary", "write")
    w(run, "write_summary", "write")
    w(run, "publish", "write")
    w(run, "compress_entries", "compress_other")
    w(pl, "error_tables", "compress_other")


def _child(timings_path: str, cli_args: list[str], instrument: bool) -> int:
    t0 = time.perf_counter()
    timers = _Timers()
    if instrument:
        _install(timers)
    from prinmix_jax.cli import main

    rc = 0
    try:
        main(args=cli_args, standalone_mode=False)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        import jax

        stats = None
        try:
            stats = jax.local_devices()[0].memory_stats()
        except Exception:       # noqa: BLE001 (backends without memory stats)
            stats = None
        keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
        out = {"seconds_in_child": time.perf_counter() - t0,
               "stages": [[sc, st, v, timers.calls.get((sc, st), 0)] for (sc, st), v in timers.seconds.items()],
               "overlapped_seconds": timers.overlapped,
               "compile_seconds": timers.compile, "compile_events": timers.compile_events,
               "peak_rss_stage": timers.peak_stage, "runtime_rss_bytes": timers.runtime_rss,
               "runtime_rss_breakdown": timers.runtime_breakdown, "peak_rss_breakdown": timers.peak_breakdown,
               "platform": jax.devices()[0].platform, "device_count": jax.device_count(),
               "device_memory": None if not stats else {k: int(stats[k]) for k in keep if k in stats}}
        with open(timings_path, "w") as f:
            json.dump(out, f)
    return rc or 0


# ----------------------------------------------------------------------------------------------------------
# Parent: run, measure, tabulate
# ----------------------------------------------------------------------------------------------------------
def write_calib(path: str, vocab: int, num_sequences: int, seq_len: int, seed: int = 0) -> str:
    np.save(path, np.random.default_rng(seed).integers(3, vocab, num_sequences * seq_len).astype(np.int32))
    return path


def run_compress(pair: dict, out: str, calib: str | None, args, log_path: str) -> dict:
    """One ``prinmix compress`` in a child process: wall time, peak RSS (``wait4``), stages, summary."""
    timings = out + ".timings.json"
    cli = ["compress", pair["base"], pair["ft"], out, "--progress" if args.progress else "--no-progress",
           "--ratio", args.ratio]
    cli += ["--calib", calib, "--seq-len", str(args.seq_len), "--num-sequences", str(args.calib_seqs)] if calib \
        else ["--data-free"]
    if not args.compile_cache:
        cli.append("--no-compile-cache")
    cli += args.extra
    code = f"import sys; sys.path[:0] = [{os.path.dirname(os.path.abspath(__file__))!r}, {REPO!r}]; " \
           f"import bench_scale as b; sys.exit(b._child({timings!r}, {cli!r}, {not args.plain!r}))"
    env = dict(os.environ)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:   # interrupted (Ctrl-C, a timeout's SIGINT): the child must not run on
            proc.kill()
            proc.wait()
            raise
    wall = time.perf_counter() - t
    rc = os.waitstatus_to_exitcode(status)
    with open(log_path) as f:
        log_text = f.read()
    if rc not in (0, 3):
        raise SystemExit(f"prinmix compress failed (exit {rc}); log {log_path}:\n{log_text[-4000:]}")
    with open(os.path.join(out, "prinmix_delta.json")) as f:
        summary = json.load(f)
    child = {}
    if os.path.isfile(timings):
        with open(timings) as f:
            child = json.load(f)
    alloc_line = next((ln for ln in log_text.splitlines() if ln.startswith("global allocation")), None)
    return {"wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "load_average": os.getloadavg(),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "exit_status": rc, "summary": summary,
            "child": child, "log_allocation": alloc_line,
            # jaxlib's CPU QR/SVD/Cholesky run on OpenBLAS, whose threads spin on a loaded machine
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def _stage_table(child: dict, wall: float, plain: bool) -> dict:
    """``{stage: seconds}`` (all scopes together) plus ``other`` = wall − the sum; None when not measured."""
    if plain or not child.get("stages"):
        return {s: None for s in STAGES + ("other",)}
    out = {s: 0.0 for s in STAGES}
    for _scope, stage, secs, _calls in child["stages"]:
        stage = stage.split(".")[0]                  # a sub-stage ("rtc_u.target") counts in its parent's column
        if stage in out:
            out[stage] += secs
    out["other"] = wall - sum(out.values())
    return out


def stage_parts(child: dict, parent: str) -> dict:
    """``{part: seconds}`` of ``parent``'s sub-stages (``parent.part``, all scopes together) and ``"rest"``, the
    parent's own exclusive seconds; empty when it has no sub-stages."""
    parts, rest = {}, 0.0
    for _scope, stage, secs, _calls in child.get("stages") or ():
        head, _, part = stage.partition(".")
        if head != parent:
            continue
        if part:
            parts[part] = parts.get(part, 0.0) + secs
        else:
            rest += secs
    return dict(parts, rest=rest) if parts else {}


def _projection(spec: dict, res: dict, plain: bool) -> dict:
    """Full-depth projection of time and bytes (see the module docstring)."""
    L, full = spec["layers"], spec["layers_full"]
    s = res["summary"]
    b = s["bytes"]
    bytes_full = b["globals"] + b["blocks"] * full / L
    n_params_full = _full_params(spec)
    proj = {"bytes": bytes_full, "ratio": bytes_full / (2 * n_params_full), "num_params": n_params_full}
    child = res["child"]
    if plain or not child.get("stages"):
        proj["seconds"] = None
        return proj
    once = sum(v for sc, _st, v, _c in child["stages"] if sc == "once")
    per_block_measured = sum(v for sc, _st, v, _c in child["stages"] if sc != "once")
    compile_block = child["compile_seconds"].get("block", 0.0)
    other = res["wall_seconds"] - once - per_block_measured       # start-up, imports, loop overhead
    per_block = max(0.0, per_block_measured - compile_block)
    proj.update(seconds=other + once + compile_block + per_block * full / L, seconds_once=once + other,
                seconds_compile_blocks=compile_block, seconds_per_block=per_block / L)
    return proj


def _full_params(spec: dict) -> int:
    full = dict(spec, layers=spec["layers_full"])
    return sum(math.prod(s) for _, s in tensor_shapes(full))


def block_params(spec: dict) -> int:
    """Parameters of one decoder block (every tensor of block 0, biases and norms included)."""
    return sum(math.prod(s) for name, s in tensor_shapes(dict(spec, layers=1)) if name.startswith("model.layers.0."))


def rss_bound(spec: dict, args, calibrated: bool, runtime_bytes: int | None = None) -> dict:
    """The host-memory bound of issue 14: three blocks of both models in float32, plus both models' embedding
    and output head in float32 (one matrix each when tied), plus the calibration state (every sequence's
    hidden states in float32, twice: a block's input and output, and one block's input Hessians in float32:
    attention, o_proj, MLP and down_proj inputs), plus the JAX process itself: ``RUNTIME_BYTES``, or what the
    child measured before reading a tensor (``runtime_bytes``, its backend's runtime) where that is more."""
    h, i, q = spec["hidden"], spec["inter"], spec["heads"] * spec["head_dim"]
    blocks = 3 * 2 * 4 * block_params(spec)
    embeddings = 2 * 4 * sum(math.prod(s) for name, s in tensor_shapes(dict(spec, layers=0)) if len(s) == 2)
    calib = (2 * 4 * args.calib_seqs * args.seq_len * h + 4 * (2 * h * h + q * q + i * i)) if calibrated else 0
    runtime = max(RUNTIME_BYTES, runtime_bytes or 0)
    total = blocks + embeddings + calib + runtime
    return {"blocks": blocks, "embeddings": embeddings, "calibration": calib, "runtime": runtime,
            "runtime_measured": runtime_bytes, "total": total}


#: What a ``prinmix compress`` process holds before it reads a tensor (Python, JAX, XLA:CPU, CVXPY; measured
#: on the scaled-down smoke run, where the model itself is a few MB). The child also measures its own
#: (``runtime_rss``); the bound takes the larger, so an accelerator's runtime (its driver, libraries and
#: compiler in host memory) is counted as measured, not assumed to be the CPU's.
RUNTIME_BYTES = int(1.1e9)


def _gb(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def _kinds(breakdown: dict) -> str:
    """``"2.31 GB (anonymous 1.20, libraries 0.95, ...)"``: an :func:`rss_breakdown` in GB."""
    return (f"{_gb(sum(breakdown.values()))} GB ("
            + ", ".join(f"{k} {_gb(v)}" for k, v in breakdown.items()) + ")")


def _sec(x) -> str:
    return "—" if x is None else (f"{x:.1f}" if x >= 0.95 else f"{x:.2f}")


def markdown(results: list[dict], args) -> str:
    cols = [s for s in STAGES + ("other",)]
    lines = ["| model | mode | wall s | " + " | ".join(STAGE_TITLES[c] for c in cols) + " | XLA compile (in stages) |",
             "|" + "---|" * (4 + len(cols))]
    for r in results:
        st = r["stages"]
        comp = r["run"]["child"].get("compile_seconds") or {}
        lines.append(f"| {r['title']} | {r['mode']} | {r['run']['wall_seconds']:.1f} | "
                     + " | ".join(_sec(st[c]) for c in cols)
                     + f" | {_sec(sum(comp.values())) if comp else '—'} |")
    for r in results:
        parts = stage_parts(r["run"]["child"], "rtc_u")
        if parts:
            lines += ["", f"RTC + U step by part ({r['title']}, {r['mode']}; seconds over all matrices, each part waited "
                          "for): " + ", ".join(f"{k} {_sec(v)}" for k, v in parts.items())]
    over = [(r, r["run"]["child"].get("overlapped_seconds")) for r in results]
    over = [(r, o) for r, o in over if o]
    if over:
        lines += [""] + [f"Overlapped with the stages above ({r['title']}, {r['mode']}; in other threads: blocks read "
                         f"ahead, U steps on other devices): " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(o.items()))
                         for r, o in over]
    lines += ["", "| model | mode | params (this pair) | peak host RSS GB | RSS / (1 block, both, f32) | "
              "runtime GB measured / in bound | bound GB (3 blocks + embeddings + calibration + runtime) | within bound | peak device mem GB | bytes | ratio (of 16-bit delta) | block-linears ratio | within budget | "
              "full depth: projected s | full depth: bytes | full depth: ratio |",
              "|" + "---|" * 16]
    for r in results:
        s = r["run"]["summary"]
        dev = (r["run"]["child"].get("device_memory") or {}).get("peak_bytes_in_use")
        p = r["projection"]
        lines.append(f"| {r['title']} | {r['mode']} | {r['num_params'] / 1e6:.1f} M | {_gb(r['run']['peak_rss_bytes'])} "
                     f"| {r['run']['peak_rss_bytes'] / r['block_f32_both']:.1f} "
                     f"| {_gb(r['rss_bound'].get('runtime_measured'))} / {_gb(r['rss_bound']['runtime'])} "
                     f"| {_gb(r['rss_bound']['total'])} "
                     f"| {'yes' if r['run']['peak_rss_bytes'] <= r['rss_bound']['total'] else 'NO'} | {_gb(dev)} | {s['bytes']['total']:,} | "
                     f"{s['ratio']:.4f} | {s['ratio_block_linears']:.4f} | {'yes' if s['within_budget'] else 'NO'} | "
                     f"{_sec(p['seconds'])} | {p['bytes'] / 1e9:.3f} GB | {p['ratio']:.4f} |")
    for r in results:
        child = r["run"]["child"]
        pb, rb = child.get("peak_rss_breakdown"), child.get("runtime_rss_breakdown")
        if pb and pb[3]:
            lines += ["", f"Host memory ({r['title']}, {r['mode']}): peak {_gb(r['run']['peak_rss_bytes'])} GB; at its last "
                          f"rise of 128 MB or more, just after {pb[1]}/{pb[0]}: {_kinds(pb[3])}"
                          + (("; JAX: " + ", ".join(f"{k} {_gb(v)} GB" for k, v in pb[4].items()))
                             if len(pb) > 4 else "")
                          + (f"; before the first tensor was read: {_kinds(rb)}" if rb else "") + "."]
    lines += ["", "Delta that survives bf16 rounding (block 0; `planted share` = energy in the planted singular "
              "subspace, white noise would give `white`):", "",
              "| model | matrix | shape | ‖Δ‖/‖W‖ intended | ‖Δ_bf16‖/‖W‖ | ‖Δ_bf16 − Δ‖/‖Δ‖ | planted share "
              "intended → bf16 (white) | top-10% σ² share intended → bf16 |", "|" + "---|" * 8]
    seen = set()
    for r in results:
        if r["key"] in seen:
            continue
        seen.add(r["key"])
        for name, d in r["delta_stats"].items():
            top = (f"{d['top10pct_energy_intended']:.2f} → {d['top10pct_energy_survived']:.2f}"
                   if "top10pct_energy_survived" in d else "—")
            lines.append(f"| {r['title']} | {name} | {d['shape'][0]}×{d['shape'][1]} | {d['rel_norm_intended']:.2e} | "
                         f"{d['rel_norm_survived']:.2e} | {d['rounding_rel_to_delta']:.2f} | "
                         f"{d['planted_share_intended']:.2f} → {d['planted_share_survived']:.2f} "
                         f"({d['planted_share_white']:.2f}) | {top} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2,llama3,qwen25",
                    help="comma-separated: " + ", ".join(MODELS) + ", or the path of a Hub config.json (or of its "
                         "folder) of a Llama, Mistral, Qwen2 or Qwen3 model: a pair with that model's shapes")
    ap.add_argument("--layers", type=int, default=1, help="decoder blocks of the written pair")
    ap.add_argument("--shapes-scale", type=float, default=1.0,
                    help="scale every dimension (head counts kept, head_dim scaled), e.g. 0.125 for a smoke run")
    ap.add_argument("--modes", default="data-free,calib", help="comma-separated: data-free, calib")
    ap.add_argument("--ratio", default="1/16")
    ap.add_argument("--seq-len", type=int, default=128, help="calibration tokens per sequence")
    ap.add_argument("--calib-seqs", type=int, default=16, help="calibration sequences")
    ap.add_argument("--delta-rel", type=float, default=1e-3, help="‖Δ‖_F / ‖W‖_F of every matrix before bf16")
    ap.add_argument("--decay", type=float, default=0.6, help="planted singular values ∝ i^-decay")
    ap.add_argument("--noise", type=float, default=0.25, help="share of the delta's energy in dense noise")
    ap.add_argument("--shard-mb", type=float, default=None,
                    help="shard size in MB (default 2000 · scale², the shard count of a real checkpoint)")
    ap.add_argument("--jobs", type=int, default=1, help="shards written at once, one process each (the same "
                                                         "bytes; e.g. the core count for a full-depth pair)")
    ap.add_argument("--workdir", default=None, help="where pairs and deltas go (default: a temporary folder, "
                                                     "removed at the end); needs 2 x the pair's bf16 size free")
    ap.add_argument("--keep", action="store_true", help="keep --workdir's contents")
    ap.add_argument("--compile-cache", action="store_true", help="let the CLI use its persistent compile cache "
                                                                 "(default: off, every run compiles cold)")
    ap.add_argument("--progress", action="store_true", help="the CLI's progress bar into the child's log (OUT.log "
                                                           "beside each delta): how far a run that is stopped got")
    ap.add_argument("--plain", action="store_true", help="run the bare CLI: no stage timers")
    ap.add_argument("--out-json", default=None, help="write every figure here")
    ap.add_argument("extra", nargs="*", help="after --: more `prinmix compress` options")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [k for k in keys if k not in MODELS and not os.path.exists(k)]
    bad += [m for m in modes if m not in ("data-free", "calib")]
    if bad:
        ap.error(f"unknown model(s)/mode(s): {bad}")
    root = args.workdir or tempfile.mkdtemp(prefix="prinmix-bench-scale-")
    os.makedirs(root, exist_ok=True)
    results = []
    try:
        for j, key in enumerate(keys):
            try:
                spec = scaled_spec(key, args.shapes_scale, args.layers)
            except Exception as e:     # noqa: BLE001 (a config.json prinmix cannot read: say so, by name)
                ap.error(f"{key}: {e}")
            # a folder of the work dir's own, never the path given (a config's folder is the user's model)
            d = os.path.join(root, key if key in MODELS else f"config{j}")
            shutil.rmtree(d, ignore_errors=True)
            shard = None if args.shard_mb is None else int(args.shard_mb * 1e6)
            print(f"[{spec['title']}] writing {args.layers}-layer pair: hidden {spec['hidden']}, intermediate "
                  f"{spec['inter']}, vocab {spec['vocab']}, heads {spec['heads']}/{spec['kv_heads']} x {spec['head_dim']}"
                  f"{', q/k/v bias' if spec['qkv_bias'] else ''} ...", flush=True)
            pair = write_pair(d, spec, delta_rel=args.delta_rel, decay=args.decay, noise=args.noise,
                              shard_bytes=shard, jobs=args.jobs)
            print(f"  {pair['bytes_per_model'] / 1e9:.3f} GB per model in {pair['num_shards']} shard(s), "
                  f"{pair['seconds']:.1f} s", flush=True)
            calib = write_calib(os.path.join(d, "calib.npy"), spec["vocab"], args.calib_seqs, args.seq_len)
            params_per_block = block_params(spec)
            for mode in modes:
                out = os.path.join(d, f"delta-{mode}")
                res = run_compress(pair, out, calib if mode == "calib" else None, args, out + ".log")
                row = {"key": key, "title": spec["title"] + ("" if args.shapes_scale == 1 else f" ×{args.shapes_scale:g}"),
                       "mode": mode, "spec": spec, "num_params": pair["num_params"],
                       "block_f32_both": 2 * 4 * params_per_block, "pair_seconds": pair["seconds"],
                       "rss_bound": rss_bound(spec, args, mode == "calib", res["child"].get("runtime_rss_bytes")),
                       "delta_stats": pair["delta_stats"], "run": res,
                       "stages": _stage_table(res["child"], res["wall_seconds"], args.plain),
                       "projection": _projection(spec, res, args.plain)}
                results.append(row)
                s = res["summary"]
                print(f"  {mode}: {res['wall_seconds']:.1f} s ({res['cpu_seconds']:.0f} CPU s, load "
                      f"{res['load_average'][1]:.1f} over 5 min), peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB, "
                      f"{s['bytes']['total']:,} bytes, ratio {s['ratio']:.4f}"
                      + (f"; {res['log_allocation']}" if res["log_allocation"] else ""), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    not_measured = [] if not args.plain else ["every stage (--plain)"]
    print()
    print(markdown(results, args))
    print()
    print("Stages: exclusive seconds of wrapped library functions (XLA compile included; its total in the last "
          "column). 'other' = wall − stages (interpreter start, imports, JAX start-up, checks, loop overhead). "
          "Projection: once + compile + per_block × full/L (see --help)."
          + (f" Not measured: {', '.join(not_measured)}." if not_measured else ""))
    if args.out_json:
        for r in results:
            r["run"]["summary"] = {k: v for k, v in r["run"]["summary"].items() if k != "matrices"} | {
                "matrices": [{k: m.get(k) for k in ("block", "name", "shape", "nbytes", "rank", "rel_output_error",
                                                    "seconds")} for m in r["run"]["summary"]["matrices"]]}
        with open(args.out_json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1, default=str)
        print(f"wrote {args.out_json}")


if __name__ == "__main__":
    main()
