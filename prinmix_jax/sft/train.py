"""The SFT pair maker: pretrain a small Llama on the standard library's sources, then fully fine-tune every
parameter on a task (sorting letters by default; :data:`~prinmix_jax.sft.data.TASKS`); save both as Hugging
Face checkpoints (with a byte-level tokenizer). :func:`make_sft_family` makes one fine-tune per task of one
pretrained base.

Deterministic given the settings (fixed data order, ``jax.random`` keys), cached under
``$PRINMIX_SFT_CACHE`` (default ``~/.cache/prinmix-jax/sft``) in a folder named by a hash of the settings
(and of the Python install's stdlib file list), written atomically (a temporary folder renamed at the end).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prinmix_jax.sft import data as D
from prinmix_jax.sft.tokenizer import EOS_ID, VOCAB_SIZE, save_hf_tokenizer

__all__ = ["SFTSettings", "SFTPair", "SFTFamily", "make_sft_pair", "make_sft_family", "model_config", "init_params", "train_lm",
           "text_batches", "default_cache_dir", "QUICK", "FULL"]

_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """Everything that decides the pair (all of it goes into the cache key).

    Attributes:
      hidden, layers, heads, kv_heads, intermediate: model shape (LlamaForCausalLM, vocab 264, untied head).
      seed: the one seed (init, data order).
      pretrain_steps, pretrain_batch, pretrain_seq, pretrain_lr, pretrain_bytes: pretraining on the stdlib.
      finetune_steps, finetune_batch, finetune_lr, finetune_examples: full fine-tuning on the task.
      task_min_len, task_max_len: letters per task example.
      task: the fine-tuning task, a key of :data:`~prinmix_jax.sft.data.TASKS`.
      text_mix: fraction of each fine-tuning batch that is still pretraining text (keeps the LM alive).
    """
    hidden: int = 96
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    seed: int = 0
    pretrain_steps: int = 400
    pretrain_batch: int = 16
    pretrain_seq: int = 128
    pretrain_lr: float = 3e-3
    pretrain_bytes: int = 2_000_000
    finetune_steps: int = 500
    finetune_batch: int = 32
    finetune_lr: float = 2e-3
    finetune_examples: int = 20000
    task_min_len: int = 3
    task_max_len: int = 6
    text_mix: float = 0.1
    task: str = "sort"

    _PRETRAIN_FIELDS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "seed", "pretrain_steps",
                        "pretrain_batch", "pretrain_seq", "pretrain_lr", "pretrain_bytes")

    def key(self, pretrain_only: bool = False) -> str:
        """Cache key: a hash of the settings (or of the pretraining ones only), the format and the corpus."""
        d = dataclasses.asdict(self)
        if pretrain_only:
            d = {k: d[k] for k in self._PRETRAIN_FIELDS}
        if d.get("task") == "sort":
            del d["task"]       # the default task keeps the keys of the pairs made before tasks existed
        d["_format"] = _FORMAT
        d["_corpus"] = D.corpus_fingerprint(D.stdlib_files())
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def task_seq(self) -> int:
        # BOS + prompt + " " + answer + EOS; the model sees seq - 1 tokens, a multiple of 16 (XLA:CPU
        # compiles some odd shapes extremely slowly).
        need = len(D.prompt_format(self.task).format("x" * self.task_max_len)) + self.task_max_len + 3
        return -(-need // 16) * 16 + 1


#: The demo's pair: 457k parameters, about 2 minutes on 2 CPU cores (pretraining 400 steps, fine-tuning 500).
#: Cheaper variants leave a fine-tune that does not learn to sort (exact match after fine-tuning, measured):
#: pretraining sequences of 64 tokens, 68%; with hidden 128 / intermediate 384, 160 or 250 pretraining steps
#: gave 1% and 29%, and 400 fine-tuning steps 64%, where the full schedule gives 99%.
FULL = SFTSettings()
#: A tiny pair for tests (seconds).
QUICK = SFTSettings(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=64, pretrain_steps=60,
                    pretrain_batch=8, pretrain_seq=64, pretrain_bytes=200_000, finetune_steps=60,
                    finetune_batch=16, finetune_examples=2000)


@dataclasses.dataclass(frozen=True)
class SFTPair:
    """Paths of a made pair. ``base`` and ``finetuned`` are HF checkpoint folders (with tokenizer)."""
    root: str
    base: str
    finetuned: str
    settings: SFTSettings
    info: dict


def default_cache_dir() -> str:
    return os.environ.get("PRINMIX_SFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prinmix-jax",
                                                               "sft")


def model_config(s: SFTSettings):
    from prinmix_jax.models import ModelConfig

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE,
          "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
          "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "bos_token_id": 256, "eos_token_id": EOS_ID, "pad_token_id": 258, "torch_dtype": "float32"}
    return ModelConfig.from_hf_config(hf, source="sft settings")


def init_params(cfg, seed: int) -> dict:
    from flax import nnx

    from prinmix_jax.models import CausalLM, params_from_model

    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    p = params_from_model(model)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)


def _loss_fn(params, cfg, ids, mask):
    from prinmix_jax.models import model_from_params

    logits = model_from_params(cfg, params)(ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, :-1]
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def train_lm(params, cfg, batches: Callable[[int], tuple[np.ndarray, np.ndarray]], *, steps: int, lr: float,
             desc: str = "train", progress: bool = True, weight_decay: float = 0.01) -> tuple[dict, list[float]]:
    """AdamW (linear warm-up, cosine decay, grad clip 1) over ``batches(step) -> (ids, loss_mask)``.

    Returns the trained params and the loss of every step.
    """
    from tqdm.auto import tqdm

    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=weight_decay))
    state = opt.init(params)

    @jax.jit
    def step(params, state, ids, mask):
        loss, g = jax.value_and_grad(_loss_fn)(params, cfg, ids, mask)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for i in bar:
        ids, mask = batches(i)
        params, state, loss = step(params, state, jnp.asarray(ids), jnp.asarray(mask))
        if i % 10 == 0 or i == steps - 1:
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses


def text_batches(ids: np.ndarray, batch: int, seq: int, seed: int):
    """Random language-model windows of a token stream, as :func:`train_lm`'s ``batches``.

    Returns ``get(step) -> (ids, loss_mask)``: ``batch`` windows of ``seq + 1`` tokens (int32) at random starts
    from a generator seeded by ``seed`` (the same sequence of batches for the same seed), and an all-ones mask.
    """
    rng = np.random.default_rng(seed)
    n = len(ids) - seq - 1

    def get(i):
        starts = rng.integers(0, n, size=batch)
        x = np.stack([ids[s:s + seq + 1] for s in starts]).astype(np.int32)
        return x, np.ones_like(x, np.float32)
    return get


def _mixed_batches(s: SFTSettings, text: np.ndarray, examples: list[dict], seed: int):
    rng = np.random.default_rng(seed + 1)
    n_text = int(round(s.text_mix * s.finetune_batch))
    n_task = s.finetune_batch - n_text
    seq = s.task_seq
    text_get = text_batches(text, max(n_text, 1), seq - 1, seed + 2)

    def get(i):
        pick = rng.integers(0, len(examples), size=n_task)
        ids, mask = D.task_batch([examples[j] for j in pick], seq)
        if n_text:
            t, tm = text_get(i)
            ids, mask = np.concatenate([ids, t]), np.concatenate([mask, tm])
        return ids, mask
    return get


def _save(params, cfg, path):
    from prinmix_jax.models import save_hf_model

    save_hf_model(jax.tree.map(np.asarray, params), path, cfg)
    save_hf_tokenizer(path)


def make_sft_pair(settings: SFTSettings = FULL, *, cache_dir: str | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None, rebuild: bool = False,
                  rebuild_base: bool | None = None) -> SFTPair:
    """Build (or reuse from the cache) the (base, fine-tuned) pair of ``settings``.

    ``rebuild`` retrains the pair even when it is cached; the pretrained base too unless ``rebuild_base`` is
    False (default: as ``rebuild``).

    Returns:
      :class:`SFTPair`; ``info`` holds the losses, times and the task/holdout description.
    """
    say = log or (lambda s: None)
    cache = os.path.abspath(cache_dir or default_cache_dir())
    root = os.path.join(cache, settings.key())
    base, ft = os.path.join(root, "base"), os.path.join(root, "finetuned")
    info_path = os.path.join(root, "info.json")
    if os.path.isfile(info_path) and not rebuild:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        say(f"reusing the SFT pair in {root}")
        return SFTPair(root, base, ft, settings, info)
    os.makedirs(cache, exist_ok=True)
    s = settings
    cfg = model_config(s)
    t0 = time.perf_counter()
    text = D.corpus_ids("train", max_bytes=s.pretrain_bytes)
    pre_root = os.path.join(cache, "pretrained-" + s.key(pretrain_only=True))
    if rebuild_base is None:
        rebuild_base = rebuild
    if os.path.isfile(os.path.join(pre_root, "info.json")) and not rebuild_base:
        from prinmix_jax.models import load_hf_params

        say(f"reusing the pretrained base in {pre_root}")
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), load_hf_params(os.path.join(pre_root, "base")))
        with open(os.path.join(pre_root, "info.json"), encoding="utf-8") as f:
            pre_info = json.load(f)
        pre_losses, pre_seconds = pre_info["pretrain_losses"], pre_info["pretrain_seconds"]
    else:
        params = init_params(cfg, s.seed)
        say(f"pretraining a {sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))}-param "
            f"Llama on {len(text)} bytes of the standard library's sources")
        params, pre_losses = train_lm(params, cfg, text_batches(text, s.pretrain_batch, s.pretrain_seq, s.seed),
                                      steps=s.pretrain_steps, lr=s.pretrain_lr, desc="pretrain", progress=progress)
        pre_seconds = time.perf_counter() - t0
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache)
        try:
            _save(params, cfg, os.path.join(tmp, "base"))
            with open(os.path.join(tmp, "info.json"), "w", encoding="utf-8") as f:
                json.dump({"pretrain_losses": pre_losses, "pretrain_seconds": pre_seconds}, f)
            if os.path.isdir(pre_root):
                shutil.rmtree(pre_root)
            os.replace(tmp, pre_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    t1 = time.perf_counter()
    examples = D.make_task(s.finetune_examples, seed=s.seed + 1000, min_len=s.task_min_len, max_len=s.task_max_len,
                           task=s.task)
    base_params = params
    ft_params, ft_losses = train_lm(params, cfg, _mixed_batches(s, text, examples, s.seed),
                                    steps=s.finetune_steps, lr=s.finetune_lr, desc="fine-tune", progress=progress)
    t2 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache)
    try:
        _save(base_params, cfg, os.path.join(tmp, "base"))
        _save(ft_params, cfg, os.path.join(tmp, "finetuned"))
        info = {"settings": dataclasses.asdict(s), "pretrain_losses": pre_losses, "finetune_losses": ft_losses,
                "pretrain_seconds": pre_seconds, "finetune_seconds": t2 - t1, "task": s.task, "task_seed": s.seed + 1000,
                "num_params": int(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(base_params))),
                "corpus": "python stdlib *.py sources (train: files i % 10 != 0; heldout: i % 10 == 0)"}
        with open(os.path.join(tmp, "info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if os.path.isdir(root):
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote the SFT pair to {root} (pretrain {pre_seconds:.0f}s, fine-tune {t2 - t1:.0f}s)")
    return SFTPair(root, base, ft, s, info)


@dataclasses.dataclass(frozen=True)
class SFTFamily:
    """Several fine-tunes of one pretrained base (one per task). ``base`` is an HF checkpoint folder;
    ``finetuned`` maps each task to its fine-tuned checkpoint folder; ``pairs`` maps each task to its
    :class:`SFTPair` (whose ``base`` folders all hold the same weights as ``base``)."""
    base: str
    finetuned: dict
    pairs: dict


def make_sft_family(settings: SFTSettings = FULL, tasks=("sort", "reverse", "sortdesc", "upper"), *,
                    cache_dir: str | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
                    rebuild: bool = False) -> SFTFamily:
    """One pretrained base (``settings``' pretraining, made once) fully fine-tuned on each of ``tasks``.

    Each fine-tune is cached like :func:`make_sft_pair`'s pair (``settings`` with ``task`` replaced), so a
    family shares its pairs with :func:`make_sft_pair` and with families of other task lists.

    Returns:
      :class:`SFTFamily`.
    """
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("make_sft_family needs at least one task")
    for t in tasks:
        D.prompt_format(t)      # unknown tasks fail before any training
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks repeat: {tasks}")
    pairs = {}
    for i, t in enumerate(tasks):
        # a forced rebuild retrains the shared base once, with the first task
        pairs[t] = make_sft_pair(dataclasses.replace(settings, task=t), cache_dir=cache_dir, progress=progress,
                                 log=log, rebuild=rebuild, rebuild_base=rebuild and i == 0)
    first = pairs[tasks[0]]
    return SFTFamily(first.base, {t: p.finetuned for t, p in pairs.items()}, pairs)
