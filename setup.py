"""wenet_hooks: recognize-ready single-file checkpoints from WeNet + DeepSpeed ZeRO training."""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
# Runs `import wenet_hooks_autoload` at interpreter start-up; that module only
# watches for WeNet's train_utils being imported (see its docstring).
PTH_FILE = "wenet_hooks.pth"


class BuildPyWithPth(build_py):
    """Put the .pth file at the root of the wheel, i.e. into site-packages."""

    def run(self):
        super().run()
        self.copy_file(str(ROOT / PTH_FILE), str(Path(self.build_lib, PTH_FILE)), preserve_mode=0)


cmdclass = {"build_py": BuildPyWithPth}

try:  # `setup.py develop`: the legacy editable install some pip/setuptools pairs still use
    from setuptools.command.develop import develop

    class DevelopWithPth(develop):
        def run(self):
            super().run()
            self.copy_file(str(ROOT / PTH_FILE), str(Path(self.install_dir, PTH_FILE)), preserve_mode=0)

    cmdclass["develop"] = DevelopWithPth
except ImportError:
    pass

try:  # setuptools >= 64: `pip install -e .` builds an editable wheel instead
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        def _install_namespaces(self, installation_dir, pth_prefix):
            super()._install_namespaces(installation_dir, pth_prefix)
            self.copy_file(str(ROOT / PTH_FILE), str(Path(installation_dir, PTH_FILE)), preserve_mode=0)

    cmdclass["editable_wheel"] = EditableWheelWithPth
except ImportError:
    pass

setup(
    name="wenet_hooks",
    version="0.1.0",
    description="Gather DeepSpeed ZeRO partitions into one verified, recognize-ready WeNet checkpoint at every save",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["wenet_hooks", "wenet_hooks.*"]) + ["wenet_hooks.conf"],
    package_dir={"wenet_hooks.conf": "conf"},
    package_data={"wenet_hooks.conf": ["*.yaml"]},
    py_modules=["wenet_hooks_autoload"],
    install_requires=[
        # Ranges a WeNet user's CUDA environment satisfies; tested with
        # torch 2.13.0 (CPU), deepspeed 0.19.8, hydra-core 1.3.8.
        "torch>=2.1",
        # 0.15.3 is where zero_to_fp32 started writing folders; the gather
        # utilities used here (safe_get_full_fp32_param) are older.
        "deepspeed>=0.15.3",
        "hydra-core>=1.3,<1.4",
        "pyyaml",
        "safetensors",  # reading folder-shaped zero_to_fp32 outputs
        "tqdm",
    ],
    # huggingface_hub: the tests make sharded zero_to_fp32 folders with DeepSpeed itself.
    extras_require={"test": ["pytest>=7", "huggingface_hub"]},
    entry_points={"console_scripts": ["wenet-hooks-convert = wenet_hooks.cli:main"]},
    cmdclass=cmdclass,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
