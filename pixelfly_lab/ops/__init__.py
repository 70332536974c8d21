"""Tier 2 — ops: block-sparse matmul and attention on a registered block layout.

* :mod:`.matmul` — ``block_sparse_matmul`` / ``sparse_lowrank_matmul``: API, reference, dispatch;
* :mod:`.torch_kernels` — the fast PyTorch path (grouped GEMMs, custom ops);
* :mod:`.triton_kernels` — Triton kernels, imported lazily on first CUDA (or interpreter) use;
* :mod:`.attention` — ``block_sparse_attention``: reference, CPU path, Triton dispatch;
* :mod:`.triton_attention` — Triton flash kernels for block-sparse attention;
* :mod:`.triton_check` — compile every Triton variant for sm_80/sm_90 without a GPU.

Imports only tiers below (``structure``, ``_checks``, utilities).
"""
