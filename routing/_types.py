"""Argument types of the routing kernels, and the decorator that compiles them.

Each kernel has exactly one explicit signature. Without one, numba compiles a new specialisation
for every distinct set of argument types a call site presents, literal constants included
(`_forbid(..., True, ...)` and `_forbid(..., flag, ...)` were two), and every specialisation of a
callee is linked into, and compiled again with, each of its callers: a cold start compiled 61
specialisations of 29 kernels. With explicit signatures numba compiles (or loads from its cache)
each kernel once, when its module is imported, and refuses other argument types instead of
compiling more; literal arguments are converted to the declared type. (Two small helpers of the
branch and bound are inlined into their caller instead, where their constant arguments pay off:
routing/bnb.py, HOT_INLINE.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from numba import njit, types

from routing import _numba_cache  # noqa: F401  (cache locators before any kernel is compiled)

I = types.int64  # noqa: E741
F = types.float64
B = types.boolean
I1 = types.int64[::1]  # C-contiguous arrays
I2 = types.int64[:, ::1]
F1 = types.float64[::1]
B1 = types.boolean[::1]
R1 = types.int8[::1]  # reason codes

T = TypeVar("T", bound=Callable[..., Any])
KERNELS: list[Any] = []  # every kernel's dispatcher, in the order compiled (routing.warm reads it)


def kernel(*args: Any, nogil: bool = False) -> Callable[[T], T]:
    """`njit` with one explicit signature (argument types; numba infers the result), cached on
    disk. Compiles at decoration: callees must be defined above their callers."""
    def wrap(fn: T) -> T:
        out: Any = njit(args, cache=True, nogil=nogil)(fn)
        KERNELS.append(out)
        compiled: T = out  # called like `fn` (numba's stubs type it as a Dispatcher)
        return compiled
    return wrap
