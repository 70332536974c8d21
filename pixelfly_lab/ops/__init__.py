"""Tier 2 — ops: block-sparse matmul and attention on a registered block layout.

* :mod:`.registry` — the layout registry: a layout validated and keyed once, per-key per-device caches;
* :mod:`.matmul` — ``block_sparse_matmul`` / ``sparse_lowrank_matmul``: API, reference, dispatch;
  :mod:`.matmul_ops` — its torch custom ops ('torch' and 'triton' paths) with autograd;
* :mod:`.torch_kernels` — the fast PyTorch path: entry points and the dense-route choice, over
  :mod:`.torch_plan` (the GEMM plan), :mod:`.torch_grouped` (grouped GEMMs, forward and backward),
  :mod:`.torch_sweep` (row chunks on worker threads), :mod:`.torch_buffers` (retained outputs);
* :mod:`.triton_kernels` — Triton launchers, imported lazily on first CUDA (or interpreter) use, over
  :mod:`.triton_jit` (the kernels), :mod:`.triton_configs` (resource model, tuning) and
  :mod:`.triton_tables` (layout index tables, no triton import);
* :mod:`.attention` — ``block_sparse_attention``: reference, CPU path, Triton dispatch;
* :mod:`.triton_attention` — Triton flash kernels for block-sparse attention;
* :mod:`.triton_check` — compile every Triton variant for sm_80/sm_90 without a GPU.

Imports only tiers below (``structure``, ``_checks``, utilities).
"""
