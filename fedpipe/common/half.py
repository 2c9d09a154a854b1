"""Half-precision dtypes (float16, bfloat16) and the float32 they accumulate in.

numpy has float16 but no bfloat16. On the numpy side (the codec, the server) bfloat16 arrays
are ``ml_dtypes.bfloat16`` arrays: the small numpy dtype extension JAX and TensorFlow use,
installed with the ``torch`` extra. It gives bfloat16 arrays numpy's own arithmetic, casts,
``isfinite`` and reductions, so every Vector operation, the codec and the payload streaming
treat them like float16 arrays. The alternative, bfloat16 carried as ``uint16`` words and
converted where arithmetic happens, would need a second dtype beside the array (specs, spec
checks, finiteness checks, every cast), each place a chance to add raw bit patterns as
integers. Without ``ml_dtypes`` everything else works and a bfloat16 array is refused with a
message saying what to install.

Sums of half-precision values are formed in float32 (:data:`ACCUMULATOR`): an fp16 sum of
many small updates stalls once its ulp exceeds them, and bfloat16 keeps only 8 significant
bits. Aggregators' running sums, the server optimizer's state and the server's master copy of
half-precision weights are float32 (Micikevicius et al., 2018, "Mixed Precision Training").
So are a client's module states (momentum, Adam's moments, SCAFFOLD's control variates): its
modules run on its gradients widened to float32, and their output is rounded to the model's
dtype once (:meth:`~fedpipe.common.optim.Optimizer.run_modules`); in float16 Adam's default
``eps=1e-8`` is 0 and ``(1 - beta_2) g^2`` underflows. What travels stays in the model's
dtype, partials and a client's aux vars included: an fp16 weighted sum (update times
sample count) overflows past 65504: with fp16 models and clients of very many samples, weight
``"uniform"`` or train in bfloat16 (which has float32's range).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "ACCUMULATOR",
    "BFLOAT16",
    "HALF_DTYPES",
    "accumulator_dtype",
    "is_float_dtype",
    "missing_bfloat16",
    "numpy_dtype",
]


def _bfloat16() -> np.dtype[Any] | None:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml-dtypes comes with the torch extra
        return None
    return np.dtype(ml_dtypes.bfloat16)


#: numpy's bfloat16 dtype (``ml_dtypes.bfloat16``), or None without ``ml-dtypes``.
BFLOAT16 = _bfloat16()

#: Names of the half-precision float dtypes.
HALF_DTYPES = frozenset({"float16", "bfloat16"})

#: The dtype half-precision values are summed in.
ACCUMULATOR = "float32"

_MISSING = "bfloat16 arrays need the ml-dtypes package: pip install 'fedpipe[torch]'"


def accumulator_dtype(name: str) -> str:
    """The dtype a sum of ``name`` values is kept in: float32 for half precision, else
    ``name`` itself."""
    return ACCUMULATOR if name in HALF_DTYPES else name


def is_float_dtype(dtype: np.dtype[Any]) -> bool:
    """True for numpy's float and complex dtypes and for bfloat16 (whose numpy kind is
    ``"V"``, not ``"f"``)."""
    return dtype.kind in "fc" or (BFLOAT16 is not None and dtype == BFLOAT16)


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype called ``name`` (``TypeError`` saying what to install for bfloat16
    without ``ml-dtypes``, or naming an unknown dtype)."""
    if name == "bfloat16" and BFLOAT16 is None:
        raise TypeError(_MISSING)
    try:
        return np.dtype(name)
    except TypeError:
        raise TypeError(f"dtype {name!r} is not a numpy dtype") from None


def missing_bfloat16() -> str:
    """Why bfloat16 is unavailable (empty when ``ml-dtypes`` is installed)."""
    return _MISSING if BFLOAT16 is None else ""
