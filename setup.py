"""Packaging for lorafast: the ``lorafast`` package and its Triton kernels as ``lorafast.kernels``."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# Lower bounds are the releases the test suite has passed with (constraints.txt pins them exactly); older ones are
# untested, not known to fail. No upper bounds: none is known to break (`LORAFAST_LATEST_DEPS=1 bash .ci/run` checks).
# What train/finetune.py needs; the tests and benchmarks compare against PEFT and need it too.
TRAIN = [
    "transformers>=5.25",
    "tokenizers>=0.23",
    "datasets>=5.2",
    "peft>=0.21",
    "safetensors>=0.8",
    "rouge-score>=0.1.2",
    "tqdm>=4.70",
    "matplotlib>=3.11",
]

BITSANDBYTES = "bitsandbytes>=0.50"

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
    packages=["lorafast", "lorafast.bases", "lorafast.kernels"],
    install_requires=[
        "torch>=2.13",
        "numpy>=2.4",
        "safetensors>=0.8",
        # Triton ships for Linux only; elsewhere lorafast runs its PyTorch path.
        "triton>=3.9; platform_system == 'Linux'",
    ],
    extras_require={
        "train": TRAIN,
        "bench": ["pytest>=9", "pytest-benchmark>=5", *TRAIN],
        # QLoRA: LoRA over bitsandbytes 4-/8-bit bases (lorafast.bases); 0.50 runs on the CPU too.
        "qlora": [BITSANDBYTES],
        "test": ["pytest>=9", "pytest-benchmark>=5", "ruff>=0.17", BITSANDBYTES, *TRAIN],
    },
)
