"""Fused attention kernels (importable as ``singularity_ds.kernels``).

Nothing lives here yet: every attention in the model goes through
``singularity_ds.models.attention.attention`` (PyTorch SDPA), the single place where a Triton kernel
will be switched in (tracked as the fused-attention issue).
"""
