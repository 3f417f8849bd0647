"""wenet_hooks: recognize-ready single-file checkpoints from WeNet + DeepSpeed ZeRO training."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="wenet_hooks",
    version="0.1.0",
    description="Gather DeepSpeed ZeRO partitions into one verified, recognize-ready WeNet checkpoint at every save",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["wenet_hooks", "wenet_hooks.*"]),
    install_requires=[
        # Ranges a WeNet user's CUDA environment satisfies; tested with
        # torch 2.13.0 (CPU), deepspeed 0.19.8, hydra-core 1.3.8.
        "torch>=2.1",
        # 0.15.3 is where zero_to_fp32 started writing folders; the gather
        # utilities used here (safe_get_full_fp32_param) are older.
        "deepspeed>=0.15.3",
        "hydra-core>=1.3,<1.4",
    ],
    extras_require={"test": ["pytest>=7"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
