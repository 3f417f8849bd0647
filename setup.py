"""What pyproject.toml cannot say: ``wenet_hooks.pth`` at the root of the wheel.

A ``.pth`` file in site-packages runs its ``import`` line at interpreter
start-up; ``wenet_hooks.wenet.autoload`` then only watches for WeNet's
``train_utils`` being imported (see its docstring).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PTH_FILE = "wenet_hooks.pth"


class BuildPyWithPth(build_py):
    """Wheels: the .pth goes beside the package, i.e. into site-packages."""

    def run(self):
        super().run()
        self.copy_file(str(ROOT / PTH_FILE), str(Path(self.build_lib, PTH_FILE)), preserve_mode=0)


cmdclass = {"build_py": BuildPyWithPth}

try:  # `pip install -e .` (setuptools >= 64) builds an editable wheel instead
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        def _install_namespaces(self, installation_dir, pth_prefix):
            super()._install_namespaces(installation_dir, pth_prefix)
            self.copy_file(str(ROOT / PTH_FILE), str(Path(installation_dir, PTH_FILE)), preserve_mode=0)

    cmdclass["editable_wheel"] = EditableWheelWithPth
except ImportError:
    pass

setup(cmdclass=cmdclass)
