"""Fused kernels, importable as ``singularity_ds.kernels`` (no compile step beyond Triton's JIT).

- :mod:`.attention`: flash attention (forward and backward) with an additive bias of any broadcast
  shape, used by the model's one attention function (``attention_impl``);
- :mod:`.benchmark`: ``singularity-ds bench kernels``.
"""
