"""The Triton kernels of the GCL loss (the bottom layer; launched by ``gcl_ops.ops``).

* ``tiles.py``: the shared ``@triton.jit`` tile helpers (pointers, the cosine tile ``S``, the
  negative and positive masks, ``_power_of_two``, ``_fp16_exponent``) and constants (``LOG2E``,
  ``LN2``, ``MAX_FP16_EXPONENT``, ``FUSED_FMA``).
* ``stats_forward.py``: ``_stats_fwd_kernel`` (one pass over the tiles: the row and column sums
  of ``exp(Z - shift)`` over the negatives and the positive logits) and ``_online_lse_kernel``
  (exact recomputation, with a running maximum, of the rows or columns whose sum underflowed).
* ``stats_backward.py``: ``_stats_bwd_kernel`` (both gradients and ``d t`` in one pass: a program
  owns a block of columns, keeps their gradient on chip and adds the rows' gradient atomically).
* ``logits.py``: ``_logits_stats_kernel`` and ``_logits_grad_kernel`` (the logits form).

The plain-PyTorch reference of each kernel is in ``gcl_ops/reference.py``:
``_stats_fwd_kernel`` and ``_online_lse_kernel`` -> ``blockwise_stats_forward`` (materialised:
``naive_gcl_stats``); ``_stats_bwd_kernel`` -> ``blockwise_stats_backward`` (or autograd through
``naive_gcl_stats``); ``_logits_stats_kernel`` -> ``naive_masked_lse``; ``_logits_grad_kernel``
-> autograd through ``naive_masked_lse`` (the loss: ``naive_gcl_loss_from_logits``).
"""
