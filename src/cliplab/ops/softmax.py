"""The Two-Pass softmax and the two Three-Pass softmax algorithms, as float32 row kernels.

Dukhan and Ablavatski, "The Two-Pass Softmax Algorithm", arXiv:2001.04438 (2020).  Reference
code: google/XNNPACK, ``src/f32-raddextexp`` (pass 1 of the two-pass algorithm),
``src/f32-vscaleextexp`` (its pass 2) and ``bench/f32-softmax.cc`` (the three variants).

For a row x of length L, ``softmax(x)_i = exp(x_i) / sum_k exp(x_k)``:

- **three-pass, recompute**: (1) ``mx = max_k x_k``; (2) ``s = sum_k exp(x_k - mx)``;
  (3) ``y_i = exp(x_i - mx) / s``.  Memory traffic 3 reads + 1 write of the row.
- **three-pass, reload**: (1) ``mx``; (2) ``y_i = exp(x_i - mx)`` stored, summed to ``s``;
  (3) ``y_i <- y_i / s``.  3 reads + 2 writes.
- **two-pass**: every ``exp(x_i)`` is held as a pair (mantissa m_i, exponent n_i) with value
  ``m_i * 2**n_i``, so nothing overflows and no max pass is needed.
  (1) accumulate ``(M, E)``: ``E' = max(E, n_i)``, ``M <- M 2**(E - E') + m_i 2**(n_i - E')``;
  (2) ``y_i = m_i * (1 / M) * 2**(n_i - E)``.  2 reads + 1 write.

Out of cache every pass is limited by memory bandwidth, so the two-pass algorithm should win
by its missing pass; in cache it does more arithmetic per element and may lose.

The exp is the reference's, shared by all three: ``n = rint(x log2 e)``; Cody-Waite reduction
``t = x - n ln2_hi + n ln2_lo`` (two constants for ln 2); ``m = p5(t)``, the degree-5
polynomial for ``e**t`` on [-ln2/2, ln2/2] (XNNPACK's coefficients); ``2**k`` built from
exponent bits (the reference's AVX2 kernels), with ``2**k`` for ``k <= -127`` taken as 0, as in
the reference, so outputs below about 2**-126 flush to zero.  (The reference's AVX-512 kernels
scale with ``vscalefps``; through LLVM's ldexp that instruction also runs on the lanes a select
discards, where results underflow and each costs a microcode assist: 10x slower on +-1000
rows here, so the bit construction is used on every CPU.)  The three-pass variants evaluate
it at ``x - mx``, the two-pass one at ``x``.

Why numba: the kernels must be compiled (a Python loop is 100x slower than memory) and all
three must share one compiler and one exp.  numba compiles them at first call for the machine
it runs on (AVX-512 or AVX2 where present), needs no C compiler on the user's or the CI
machine, and ships as wheels (``pip install cliplab[kernels]``); a C extension built at install
time would need a compiler everywhere cliplab is installed.  Compiled code is cached on disk
(numba ``cache=True``): the kernels compile once (a few seconds), and the first call of each
later process loads them (about 2 s, mostly numba's own start-up).

Deviations from the reference, each deliberate:

- Sums are accumulated in float32 lanes (16 lanes, as the reference keeps 8- or 16-wide SIMD
  accumulators) that are flushed into float64 every 256 elements; the reference keeps float32
  accumulators for the whole row, which loses digits on long rows (16 float32 lanes: relative
  error 4e-6 at 3e7 elements, measured) while this keeps 1e-6 for any length.  The cost is one
  vector operation per 256 elements.
- The three-pass variants compensate the rounding error of ``x - mx`` (TwoSum, four extra
  additions per exp) and fold it into the reduced argument.  Without it their relative error
  is ``|x - mx| 2**-24``, up to 5e-6 for outputs still above 1e-38 (``torch.softmax`` has the
  same error); the two-pass algorithm needs nothing, its reduction of ``x`` itself is exact.
- ``-inf`` inputs (masked attention) give exactly 0, as in ``torch.softmax``; a row holding
  only ``-inf``, or any NaN or ``+inf``, gives a row of NaN, as ``torch.softmax`` does.
- Every streaming loop of every variant prefetches 16 KiB ahead in software (the reference
  relies on the hardware prefetcher, which on the benchmark machine left the exp loops at a
  quarter to a half of their in-cache speed beyond L2).
- Rows are processed one after another on one thread: numba's default threading layer aborts
  the process when two Python threads call a parallel kernel at once, and the attention of a
  served model runs in several threads.
- Domain of the two-pass kernel (the algorithm's, not this code's): ``n = rint(x log2 e)`` is
  rounded from a float32 product, so for large ``|x|`` the reduced argument leaves the
  polynomial's interval.  Measured relative error: below 3e-7 up to ``|x| = 3e5``, 1.1e-6 at
  1e6, 2e-5 at 4e6, NaN beyond about 1e9.  Attention logits are far inside; the three-pass
  variants, which reduce ``x - mx <= 0``, take any finite input.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..validation import check_choice

try:  # the kernels need numba (extra ``kernels``); the module imports without it
    import numba
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

__all__ = ["softmax", "attention_softmax", "ALGORITHMS"]

#: The algorithms of :func:`softmax`, by name.
ALGORITHMS = ("two-pass", "three-pass-recompute", "three-pass-reload")

_F = np.float32
_LOG2E = _F(float.fromhex("0x1.715476p+0"))
_LN2_HI = _F(float.fromhex("0x1.62E43p-1"))       # ln 2 = _LN2_HI - _LN2_LO (Cody-Waite)
_LN2_LO = _F(float.fromhex("0x1.05C61p-29"))
_C1 = _F(float.fromhex("0x1.FFFFF6p-1"))           # p5(t) = 1 + t (c1 + t (c2 + ... t c5))
_C2 = _F(float.fromhex("0x1.FFFDC6p-2"))
_C3 = _F(float.fromhex("0x1.555A80p-3"))
_C4 = _F(float.fromhex("0x1.573A1Ap-5"))
_C5 = _F(float.fromhex("0x1.0F9F9Cp-7"))
_ONE, _ZERO, _BIAS = _F(1.0), _F(0.0), _F(127.0)
_EMIN = _F(-127.0)                                 # 2**k for k <= -127 is taken as 0 (no denormals, no
                                                   # underflow: those cost a microcode assist each)
_NEG_INF = _F(-np.inf)
_LANES = 16                                        # accumulators: one AVX-512 vector of float32
_FLUSH = 16                                        # lane rows (of 16 elements) between float64 flushes
_AHEAD = 4096                                      # software prefetch distance, elements (16 KiB)
# No "reassoc" (it would undo the TwoSum and the rounding of n) and no "nnan"/"ninf" (-inf is
# a legal input): contraction to FMA, as in the reference, and the rest.
_FASTMATH = {"nsz", "arcp", "contract", "afn"}

if numba is not None:
    @_intrinsic
    def _rint(typingctx, x):
        """Round to nearest even, float32 -> float32 (llvm.rint: one vroundps)."""
        if x != _types.float32:
            return None

        def codegen(context, builder, signature, args):
            f32 = _ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.rint.f32", fnty=_ir.FunctionType(f32, [f32]))
            return builder.call(fn, args)
        return _types.float32(_types.float32), codegen

    @_intrinsic
    def _bits_exp2(typingctx, k):
        """The float32 whose exponent field is ``k`` (an integral float in [0, 254]): 2**(k - 127)."""
        if k != _types.float32:
            return None

        def codegen(context, builder, signature, args):
            i32 = _ir.IntType(32)
            bits = builder.shl(builder.fptosi(args[0], i32), _ir.Constant(i32, 23))
            return builder.bitcast(bits, _ir.FloatType())
        return _types.float32(_types.float32), codegen

    def _prefetcher(write):
        @_intrinsic
        def prefetch(typingctx, arr, index):
            """Hint the cache line of ``arr[index]`` into L1 (llvm.prefetch; never faults, even past the end)."""
            if not isinstance(arr, _types.Array) or not isinstance(index, _types.Integer):
                return None

            def codegen(context, builder, signature, args):
                data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
                i8p, i32 = _ir.IntType(8).as_pointer(), _ir.IntType(32)
                ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
                fn = builder.module.declare_intrinsic(
                    "llvm.prefetch", [i8p], fnty=_ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32]))
                builder.call(fn, [ptr, _ir.Constant(i32, int(write)), _ir.Constant(i32, 3), _ir.Constant(i32, 1)])
                return context.get_dummy_value()
            return _types.void(arr, index), codegen
        return prefetch

    # Every streaming loop of every variant prefetches one cache line (16 floats) 16 KiB ahead
    # per 16 elements: without it the compute-heavy loops ran at a third of their in-cache speed
    # on rows beyond L2 here (the hardware prefetcher did not keep up).
    _prefetch_read, _prefetch_write = _prefetcher(False), _prefetcher(True)

    _jit = numba.njit(fastmath=_FASTMATH, cache=True)
    _inline = numba.njit(fastmath=_FASTMATH, cache=True, inline="always")

    @_inline
    def _scale(m, d):
        """m * 2**d for an integral float32 d <= 0; 0 for d <= -127 (and for NaN d)."""
        d = d if d > _EMIN else _EMIN
        return m * _bits_exp2(d + _BIAS)

    @_inline
    def _extexp(x, lo):
        """exp(x + lo) as (m, n), value m * 2**n; m in [0.7, 1.42], m = 0 where x = -inf.

        ``lo`` is a small correction of the argument (the TwoSum error of the three-pass
        variants; 0 for the two-pass one).
        """
        n = _rint(x * _LOG2E)
        t = x - n * _LN2_HI                        # Cody-Waite: exact (fused) for |x log2e| < 2**22
        t = t + n * _LN2_LO + lo
        m = _ONE + t * (_C1 + t * (_C2 + t * (_C3 + t * (_C4 + t * _C5))))  # p5(t) ~ e**t
        m = _ZERO if x == _NEG_INF else m
        return m, n

    @_inline
    def _exp_shifted(x, mx):
        """exp(x - mx) in float32 for x <= mx, with the rounding error of ``x - mx`` compensated."""
        z = x - mx
        bv = z - x                                 # TwoSum(x, -mx): z + err = x - mx exactly
        err = (x - (z - bv)) + (-mx - bv)
        m, n = _extexp(z, err)
        return _ZERO if n <= _EMIN else _scale(m, n)   # (m is not finite below); NaN stays NaN

    # --- pass kernels on one row; lane arrays come from the caller (one allocation per call) ---

    @_inline
    def _row_max(x, lm):
        L = x.shape[0]
        lm[:] = _NEG_INF
        nb = L // _LANES
        for b in range(nb):
            base = b * _LANES
            _prefetch_read(x, base + _AHEAD)
            for j in range(_LANES):
                v = x[base + j]
                lm[j] = v if v > lm[j] else lm[j]
        mx = _NEG_INF
        for j in range(_LANES):
            mx = lm[j] if lm[j] > mx else mx
        for i in range(nb * _LANES, L):
            mx = x[i] if x[i] > mx else mx
        return mx

    @_inline
    def _row_sum_exp(x, y, mx, ls, lt, store):
        """sum_i exp(x_i - mx) (float64); with ``store`` also writes each exp to ``y``."""
        L = x.shape[0]
        ls[:] = _ZERO
        lt[:] = 0.0
        nb = L // _LANES
        for b in range(nb):
            base = b * _LANES
            _prefetch_read(x, base + _AHEAD)
            if store:
                _prefetch_write(y, base + _AHEAD)
                for j in range(_LANES):
                    e = _exp_shifted(x[base + j], mx)
                    y[base + j] = e
                    ls[j] += e
            else:
                for j in range(_LANES):
                    ls[j] += _exp_shifted(x[base + j], mx)
            if (b + 1) % _FLUSH == 0:
                for j in range(_LANES):
                    lt[j] += ls[j]
                    ls[j] = _ZERO
        total = 0.0
        for j in range(_LANES):
            total += lt[j] + ls[j]
        for i in range(nb * _LANES, L):
            e = _exp_shifted(x[i], mx)
            if store:
                y[i] = e
            total += e
        return total

    @_jit
    def _three_pass_recompute_rows(x, y):
        lm = np.empty(_LANES, np.float32)
        ls = np.empty(_LANES, np.float32)
        lt = np.empty(_LANES, np.float64)
        for r in range(x.shape[0]):
            xr, yr = x[r], y[r]
            mx = _row_max(xr, lm)                                      # pass 1: max
            s = _row_sum_exp(xr, yr, mx, ls, lt, False)                # pass 2: sum exp(x - mx)
            if not s > 0.0:                                            # all -inf, or NaN/+inf
                yr[:] = np.nan
                continue
            inv = _F(1.0 / s)
            L = xr.shape[0]
            for b in range(L // _LANES):                               # pass 3: recompute, scale
                base = b * _LANES
                _prefetch_read(xr, base + _AHEAD)
                _prefetch_write(yr, base + _AHEAD)
                for j in range(_LANES):
                    yr[base + j] = _exp_shifted(xr[base + j], mx) * inv
            for i in range(L - L % _LANES, L):
                yr[i] = _exp_shifted(xr[i], mx) * inv

    @_jit
    def _three_pass_reload_rows(x, y):
        lm = np.empty(_LANES, np.float32)
        ls = np.empty(_LANES, np.float32)
        lt = np.empty(_LANES, np.float64)
        for r in range(x.shape[0]):
            xr, yr = x[r], y[r]
            mx = _row_max(xr, lm)                                      # pass 1: max
            s = _row_sum_exp(xr, yr, mx, ls, lt, True)                 # pass 2: store and sum exp
            if not s > 0.0:
                yr[:] = np.nan
                continue
            inv = _F(1.0 / s)
            L = yr.shape[0]
            for b in range(L // _LANES):                               # pass 3: reload, scale
                base = b * _LANES
                _prefetch_write(yr, base + _AHEAD)
                for j in range(_LANES):
                    yr[base + j] = yr[base + j] * inv
            for i in range(L - L % _LANES, L):
                yr[i] = yr[i] * inv

    @_jit
    def _two_pass_rows(x, y):
        am = np.empty(_LANES, np.float32)          # lane accumulators (mantissa, exponent)
        ae = np.empty(_LANES, np.float32)
        tm = np.empty(_LANES, np.float64)          # float64 lane totals, flushed into
        te = np.empty(_LANES, np.float32)
        for r in range(x.shape[0]):
            xr, yr = x[r], y[r]
            L = xr.shape[0]
            am[:] = _ZERO
            ae[:] = _NEG_INF
            tm[:] = 0.0
            te[:] = _NEG_INF
            nb = L // _LANES
            # pass 1: (M, E) <- (M 2**(E - E') + m 2**(n - E'), E'),  E' = max(E, n)
            for b in range(nb):
                base = b * _LANES
                _prefetch_read(xr, base + _AHEAD)
                for j in range(_LANES):
                    m, n = _extexp(xr[base + j], _ZERO)
                    e = n if n > ae[j] else ae[j]
                    am[j] = _scale(am[j], ae[j] - e) + _scale(m, n - e)
                    ae[j] = e
                if (b + 1) % _FLUSH == 0:          # same rule, float32 lanes into float64 lanes
                    for j in range(_LANES):
                        e = ae[j] if ae[j] > te[j] else te[j]
                        tm[j] = tm[j] * _scale(_ONE, te[j] - e) + _scale(am[j], ae[j] - e)
                        te[j] = e
                        am[j] = _ZERO
                        ae[j] = _NEG_INF
            M, E = 0.0, _NEG_INF
            for j in range(_LANES):                # reduce the lanes, float64 totals and the rest
                e = te[j] if te[j] > E else E
                M = M * _scale(_ONE, E - e) + tm[j] * _scale(_ONE, te[j] - e)
                E = e
                e = ae[j] if ae[j] > E else E
                M = M * _scale(_ONE, E - e) + _scale(am[j], ae[j] - e)
                E = e
            for i in range(nb * _LANES, L):
                m, n = _extexp(xr[i], _ZERO)
                e = n if n > E else E
                M = M * _scale(_ONE, E - e) + _scale(m, n - e)
                E = e
            if not M > 0.0:                        # all -inf, or NaN/+inf
                yr[:] = np.nan
                continue
            inv = _F(1.0 / M)
            for b in range(nb):                    # pass 2: y = m (1 / M) 2**(n - E)
                base = b * _LANES
                _prefetch_read(xr, base + _AHEAD)
                _prefetch_write(yr, base + _AHEAD)
                for j in range(_LANES):
                    m, n = _extexp(xr[base + j], _ZERO)
                    yr[base + j] = _scale(m * inv, n - E)
            for i in range(nb * _LANES, L):
                m, n = _extexp(xr[i], _ZERO)
                yr[i] = _scale(m * inv, n - E)

    _KERNELS = {"two-pass": _two_pass_rows, "three-pass-recompute": _three_pass_recompute_rows,
                "three-pass-reload": _three_pass_reload_rows}


def _require_numba() -> None:
    if numba is None:
        raise ImportError("the softmax kernels need numba: pip install 'cliplab[kernels]' (or pip install numba)")


def softmax(x, axis: int = -1, *, algorithm: str = "two-pass", out: np.ndarray | None = None) -> np.ndarray:
    """Softmax of float32 rows by the two-pass or a three-pass algorithm (module docstring).

    Parameters
    ----------
    x : array-like, shape (N, L) or any shape
        Scores.  float32 is used as it is; other real dtypes (float16, float64, integers) are
        converted to float32, the kernels' only type.  ``-inf`` entries get probability 0.
    axis : int, default=-1
        The axis the probabilities sum over.
    algorithm : {"two-pass", "three-pass-recompute", "three-pass-reload"}, default="two-pass"
    out : numpy.ndarray, optional
        float32 array of the shape of ``x`` to write into (and return).  When ``x`` is a
        C-contiguous float32 array and ``axis`` is its last, the kernel writes into ``out``
        directly, with no copy of either (the benchmark's path).

    Returns
    -------
    numpy.ndarray, float32, the shape of ``x``
        Each slice along ``axis`` sums to 1.  A slice holding only ``-inf``, or any NaN or
        ``+inf``, is NaN (as in ``torch.softmax``).

    Raises
    ------
    UsageError
        ``x`` is not real-valued (complex, bool, object, strings), has no axis, ``axis`` or
        ``algorithm`` is not valid, or ``out`` is not a float32 array of the shape of ``x``.
    ImportError
        numba is not installed.

    Notes
    -----
    Relative error against float64 softmax below 1e-6 for every output above 2**-126 (smaller
    ones may flush to zero: absolute error under 2**-125); tested on random, constant, +-1000 and
    single-element rows and on rows of 2**20 elements.  The two-pass kernel needs
    ``|x| <= 3e5`` for that bound (module docstring).

    References
    ----------
    M. Dukhan, A. Ablavatski, "The Two-Pass Softmax Algorithm", arXiv:2001.04438, 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from cliplab.ops.softmax import softmax
    >>> p = softmax(np.array([[0.0, np.log(3.0)], [1000.0, -1000.0]], np.float32))
    >>> p.round(6).tolist()
    [[0.25, 0.75], [1.0, 0.0]]
    """
    check_choice("algorithm", algorithm, ALGORITHMS)
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise UsageError(f"softmax needs real numbers (float or integer), got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise UsageError("softmax needs an array with at least one axis, got a scalar")
    if not isinstance(axis, (int, np.integer)) or not -arr.ndim <= axis < arr.ndim:
        raise UsageError(f"axis must be an integer in [{-arr.ndim}, {arr.ndim}) for an array of shape "
                         f"{arr.shape}, got {axis!r}")
    if out is not None and not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == arr.shape):
        raise UsageError(f"out must be a float32 array of shape {arr.shape}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    _require_numba()
    moved = np.moveaxis(arr, axis, -1)
    n_rows = int(np.prod(moved.shape[:-1]))
    rows = np.ascontiguousarray(moved.reshape(n_rows, moved.shape[-1]), dtype=np.float32)   # (N, L)
    direct = (out is not None and axis in (-1, arr.ndim - 1) and out.flags.c_contiguous
              and not np.shares_memory(out, rows))
    result = out.reshape(rows.shape) if direct else np.empty_like(rows)               # (N, L)
    if rows.size:
        _KERNELS[algorithm](rows, result)
    if direct:
        return out
    result = np.moveaxis(result.reshape(moved.shape), -1, axis)
    if out is None:
        return result
    np.copyto(out, result)
    return out


def attention_softmax(scores, *, algorithm: str = "two-pass"):
    """The attention softmax over the last axis of a CPU torch tensor, by :func:`softmax`.

    A drop-in for ``torch.softmax(scores, dim=-1)`` in inference: additive masks
    (``-inf`` entries) give exact zeros.  No gradient flows through it.

    Parameters
    ----------
    scores : torch.Tensor, shape (..., T_q, T_k)
        Attention logits on the CPU, any float dtype (computed in float32).
    algorithm : str, default="two-pass"
        One of :data:`ALGORITHMS`.

    Returns
    -------
    torch.Tensor
        Probabilities over the last axis, same shape, dtype and device as ``scores``.

    Raises
    ------
    UsageError
        ``scores`` is not a floating tensor on the CPU.

    Examples
    --------
    >>> import torch
    >>> from cliplab.ops import attention_softmax
    >>> s = torch.tensor([[0.0, 0.0, float("-inf")]])
    >>> attention_softmax(s).tolist()
    [[0.5, 0.5, 0.0]]
    """
    import torch

    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise UsageError(f"attention_softmax needs a floating torch tensor, got {type(scores).__name__}"
                         f"{f' of dtype {scores.dtype}' if isinstance(scores, torch.Tensor) else ''}")
    if scores.device.type != "cpu":
        raise UsageError(f"attention_softmax runs on the CPU; scores are on {scores.device} "
                         "(use torch.softmax there)")
    x = scores.detach().to(torch.float32).contiguous().numpy()
    y = softmax(x, -1, algorithm=algorithm)
    return torch.from_numpy(y).to(scores.dtype)
