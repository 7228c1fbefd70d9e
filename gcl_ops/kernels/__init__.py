"""The Triton kernels of the GCL loss (the bottom layer; launched by ``gcl_ops.launchers``).

* ``tiles.py``: the shared ``@triton.jit`` helpers: offsets, the cosine tile ``S`` (streamed over
  ``k`` or from operands on chip), TF32 rounding, the negative and positive masks, powers of two.
* ``stats_forward.py``: ``_stats_fwd_kernel`` (one pass over the tiles: the row and column sums
  of ``exp(Z - shift)`` over the negatives and the positive cosines) and ``_online_lse_kernel``
  (exact recomputation, with a running maximum, of the rows or columns whose sum underflowed).
* ``stats_backward.py``: ``_stats_bwd_kernel`` (a program owns a block of one side and keeps its
  gradient on chip; launched once per side, or once with the other side's gradient added
  atomically).
* ``logits.py``: ``_logits_stats_kernel`` and ``_logits_grad_kernel`` (the logits form).

The plain-PyTorch equivalent of each: ``_stats_fwd_kernel`` and ``_online_lse_kernel`` ->
``gcl_ops.blockwise.blockwise_stats_forward`` (materialised: ``gcl_ops.reference.naive_gcl_stats``);
``_stats_bwd_kernel`` -> ``blockwise_stats_backward`` (or autograd through ``naive_gcl_stats``);
the logits kernels -> ``gcl_ops.reference.naive_masked_lse`` and autograd through it.
"""
