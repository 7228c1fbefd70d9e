"""Triton, when it is installed, and whether its kernels run under the CPU interpreter.

Triton decides between compiling and interpreting when a kernel is *decorated*, from the
environment variable ``TRITON_INTERPRET``; it must be ``1`` before ``gcl_ops`` (or anything else
that defines kernels) imports triton. Where triton is missing (it is a Linux-only dependency),
a stand-in lets the kernel modules import; calling a kernel then raises.
"""

from __future__ import annotations

import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    HAS_TRITON = False

    def _unavailable(*args, **kwargs):
        raise RuntimeError("triton is not installed: use impl='torch' (the PyTorch path)")

    def _passthrough_decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = types.SimpleNamespace(
        jit=_passthrough_decorator,
        autotune=_passthrough_decorator,
        Config=lambda *args, **kwargs: None,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, (n - 1).bit_length()),
    )
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["HAS_TRITON", "interpreting", "tl", "triton"]


def interpreting(kernel: object) -> bool:
    """True if ``kernel`` was decorated while ``TRITON_INTERPRET=1`` (it runs on the CPU)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    while hasattr(kernel, "fn"):  # autotuner / heuristics wrappers
        if isinstance(kernel, InterpretedFunction):
            return True
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)
