"""Packaging for lorafast: the ``lorafast`` package and its Triton kernels as ``lorafast.kernels``."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# What train/finetune.py needs; the tests and benchmarks compare against PEFT and need it too.
TRAIN = [
    "transformers>=4.45",
    "tokenizers",
    "datasets>=2.19",
    "peft>=0.14",
    "safetensors",
    "rouge-score",
    "tqdm",
    "matplotlib",
]

BITSANDBYTES = "bitsandbytes>=0.50,<0.51"

setup(
    name="lorafast",
    version="0.1.0",
    description="Fused Triton LoRA kernels and a drop-in nn.Linear replacement for PyTorch",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The kernels live in lorafast/kernels: a top-level ``kernels`` folder would shadow the unrelated PyPI
    # package of that name for anything run from the checkout (transformers imports it to probe for it).
    packages=["lorafast", "lorafast.kernels"],
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        # Triton ships for Linux only; elsewhere lorafast runs its PyTorch path.
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        "train": TRAIN,
        "bench": ["pytest>=8", "pytest-benchmark>=4", *TRAIN],
        # QLoRA: LoRA over bitsandbytes 4-/8-bit bases (lorafast.quantized); 0.50 runs on the CPU too.
        "qlora": [BITSANDBYTES],
        "test": ["pytest>=8", "pytest-benchmark>=4", "ruff", BITSANDBYTES, *TRAIN],
    },
)
