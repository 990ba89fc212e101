"""Compression settings."""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np

METHODS = ("prinmix", "deltacome", "bitdelta", "lowrank", "uniform")
SVD_MODES = ("auto", "full", "gram", "truncated")
GRIDS = ("mse", "minmax")
#: How much per-index metadata an SVD-quantised matrix stores (``CompressionConfig.index_metadata``).
INDEX_METADATA = ("lean", "full")
#: The candidate widths at ratios of 1/16 and above, and below it (``CompressionConfig.bits=None``).
DEFAULT_BITS = (0, 2, 3, 4, 8)
LOW_BUDGET_BITS = (0, 1, 2, 3, 4, 8)          # prinmix_jax.core.quantizer.GRIDS (not imported: config stays jax-free)
_SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}
#: How calibration inputs reach each block (:func:`prinmix_jax.pipeline.compress_model`).
CALIBRATION_MODES = ("parallel", "sequential")
#: Allocation scopes: one ILP per matrix, or one over every block linear under their total budget.
SCOPES = ("matrix", "global")


def parse_ratio(text: str) -> float:
    """A storage ratio written as a number or a fraction (``"1/16"``, ``"0.0625"``, ``"1e-2"``) -> float > 0.

    Raises:
      ValueError: not a number or a fraction, or not > 0.
    """
    try:
        r = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction like 1/16 or 0.0625, got {text!r}") from None
    if not r > 0:
        raise ValueError(f"must be > 0 (1/16 = 1 bit/param), got {text!r}")
    return r


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """How one delta matrix is compressed.

    Attributes:
      ratio: storage budget relative to a 16-bit delta (1/16 = one bit per parameter).
      bits: candidate widths of a singular index; 0 = the index may be dropped. ``None`` (default):
        :data:`DEFAULT_BITS` at ``ratio >= 1/16``, :data:`LOW_BUDGET_BITS` (with 1-bit sign codes) below,
        where they pay (docs/benchmarks.md "Below one bit"; at 1/16 they do not, and they would make the
        truncated SVD fall back to the full one).
      group_size: entries per quantisation scale/zero along each row of V and column of U
        (``None`` = one group per row/column).
      rtc: apply Reconstruction Target Correction before quantising U.
      act_order: GPTQ processes columns by decreasing Hessian diagonal (static groups).
      damp: GPTQ relative damping (escalated if a Hessian is not positive definite).
      rtc_damp: relative damping of the RTC least-squares solve.
      block_size: GPTQ lazy-batch block size (does not change the result).
      max_widths: optional cap on the number of distinct widths (ILP constraint).
      solver: CVXPY MILP solver (``"HIGHS"``, ``"SCIPY"``, ...) of the allocation's count MILP, used
        when the special-purpose MCKP solver's bound alone does not prove ``ilp_gap``
        (:mod:`prinmix_jax.allocation`).
      time_limit: optional MILP time limit in seconds (hitting it is an error).
      ilp_gap: relative optimality gap the allocation must prove against a lower bound on the optimum
        (reported as ``Allocation.gap``); 0 asks for the exact optimum (to the solver's tolerances).
      scale_dtype: ``"float16"`` or ``"float32"`` storage of quantisation scales.
      grid: the quantisation grid of U and V codes: ``"mse"`` (default: symmetric grids at widths 1–2,
        shrunk min–max ranges at ≥ 3, scales of least squared error) or ``"minmax"`` (the reference
        GPTQ's); :mod:`prinmix_jax.core.quantizer`.
      index_metadata: ``"lean"`` (default, delta format version 3) or ``"full"`` (version 2's layout).
        Lean: no per-index width byte (the widths are implied by the width groups); where ``u_i`` or
        ``V_i`` has a single quantisation group (length ≤ ``group_size``), its scale is folded into the
        stored σ; with ``grid="mse"`` the widths 1–2 use symmetric grids only (``"mse-sym"``), whose zero
        points are implied. A 96×96 index then costs 32 bits of metadata instead of 88
        (:func:`~prinmix_jax.costs.index_cost_bits`, docs/format.md).
      whiten: with a calibration Hessian, take the SVD of ``ΔW L`` (``H + λI = L Lᵀ``) and store
        ``V' L⁻¹``: singular indices ordered by output error, not weight error (project choice;
        :func:`~prinmix_jax.methods.prinmix.table_svd`). Data-free runs are unaffected.
      whiten_damp: the relative damping λ / mean(diag H) of the whitening factor.
      refit_sigma: after GPTQ of U, store the least-squares σ of the quantised factors
        (:func:`~prinmix_jax.core.rtc.refit_sigma`; project choice).
      refine_rounds: rounds of alternating refinement after GPTQ of U (project choice, PrinMix family):
        V re-fitted by least squares to ``Û Σ`` (:func:`~prinmix_jax.core.rtc.v_target`) and quantised by
        GPTQ at the same widths, then RTC and GPTQ of U again; the factors of the round with the lowest
        output error are kept. 0 = the paper's single pass.
      u_error: add an estimate of each index's U-side quantisation error to the (exact, V-only)
        error table before the allocation (project choice; the paper allocates on V alone).
      svd: how each delta's SVD is taken. ``"gram"``: the top ``k = ceil((1 + svd_margin) · k_max)``
        triplets (``k_max``: the most indices the budget can keep) from the eigenvectors of ``ΔWᵀΔW`` and a
        Rayleigh–Ritz step on ``ΔW`` (:func:`~prinmix_jax.core.svd.gram_svd`); ``"truncated"``: the same
        ``k`` from a randomized range finder (:func:`~prinmix_jax.core.svd.truncated_svd`, slower and less
        accurate on the CPU); ``"full"``: XLA's full thin SVD, every row kept (the reference); ``"auto"``
        (default): ``"gram"`` where ``k`` is at most 0.6 of ``min(m, n)``, otherwise the full SVD cut to
        ``k`` rows (:func:`~prinmix_jax.methods.shared.svd_rank`, docs/method.md "Truncated SVD").
      svd_margin: extra indices over ``k_max`` the truncated SVD returns, as a fraction of ``k_max`` (the
        allocation may keep an index of smaller σ; indices beyond ``k`` are dropped).
      svd_oversample: extra random samples of the range finder (``svd="truncated"``), as a fraction of ``k``.
      svd_iters: subspace (power) iterations of the range finder (``svd="truncated"``).
    """
    ratio: float = 1 / 16
    bits: tuple[int, ...] | None = None
    group_size: int | None = 128
    rtc: bool = True
    act_order: bool = True
    damp: float = 0.01
    rtc_damp: float = 1e-4
    block_size: int = 128
    max_widths: int | None = None
    solver: str = "HIGHS"
    time_limit: float | None = None
    ilp_gap: float = 1e-4
    scale_dtype: str = "float16"
    grid: str = "mse"
    index_metadata: str = "lean"
    whiten: bool = False
    refit_sigma: bool = False
    refine_rounds: int = 0
    whiten_damp: float = 0.01
    u_error: bool = True
    svd: str = "auto"
    svd_margin: float = 0.25
    svd_oversample: float = 0.5
    svd_iters: int = 4

    def __post_init__(self):
        if self.bits is None and isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool):
            object.__setattr__(self, "bits", DEFAULT_BITS if self.ratio >= 1 / 16 - 1e-12 else LOW_BUDGET_BITS)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) \
                or not math.isfinite(self.ratio) or self.ratio <= 0:
            raise ValueError(f"ratio must be a finite number > 0, got {self.ratio!r}")
        try:
            bits = tuple(sorted({int(b) for b in self.bits}))
        except (TypeError, ValueError):
            raise ValueError(f"bits must be a sequence of integers, got {self.bits!r}") from None
        if any(b < 0 or b > 8 for b in bits):
            raise ValueError(f"bit widths must be in 0..8, got {bits}")
        if not any(b > 0 for b in bits):
            raise ValueError(f"bits {bits} has no nonzero width: at least one width in 1..8 is needed")
        object.__setattr__(self, "bits", bits)
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        for name in ("damp", "rtc_damp", "whiten_damp"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if self.max_widths is not None and self.max_widths < 1:
            raise ValueError(f"max_widths must be >= 1 or None, got {self.max_widths!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.index_metadata not in INDEX_METADATA:
            raise ValueError(f"index_metadata must be one of {', '.join(INDEX_METADATA)}, "
                             f"got {self.index_metadata!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if not 0 <= self.ilp_gap < 1:
            raise ValueError(f"ilp_gap must be in [0, 1), got {self.ilp_gap!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 or None, got {self.time_limit!r}")
        if self.svd not in SVD_MODES:
            raise ValueError(f"svd must be one of {', '.join(SVD_MODES)}, got {self.svd!r}")
        for name in ("svd_margin", "svd_oversample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("svd_iters", "refine_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")

    @property
    def scale_jnp_dtype(self):
        return _SCALE_DTYPES[self.scale_dtype]

    @property
    def lean(self) -> bool:
        """Lean index metadata (``index_metadata="lean"``)."""
        return self.index_metadata == "lean"

    @property
    def quant_grid(self) -> str:
        """The grid the quantiser uses: ``"mse-sym"`` for ``grid="mse"`` with lean metadata, else ``grid``."""
        return "mse-sym" if self.grid == "mse" and self.lean else self.grid

    @property
    def zero_free_max_bits(self) -> int:
        """Widths up to this store no zero points (their grid is symmetric): 2 under ``"mse-sym"``, else 0."""
        return 2 if self.quant_grid == "mse-sym" else 0

    @property
    def scale_bits(self) -> int:
        return 8 * np.dtype(self.scale_jnp_dtype).itemsize

    def budget_bits(self, m: int, n: int) -> int:
        """The storage budget ``C = ratio · 16 · m · n`` bits (rounded down)."""
        return int(math.floor(self.ratio * 16 * m * n + 1e-9))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
