"""Only what pyproject.toml cannot say: ``simpletuner_dmd_autoload.pth`` goes to the root of site-packages, where
Python's ``site`` module runs it at start-up (the import hook that serves the plugin's methods in ``simpletuner
train``; see ``simpletuner_dmd_autoload.py``). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "simpletuner_dmd_autoload.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(Path(__file__).resolve().parent / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
