"""singularity-ds: Singularity (single-frame training, multi-frame inference) on DeepSpeed."""
__version__ = "0.1.0"
