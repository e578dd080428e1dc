"""One build step pyproject.toml cannot declare: put ``p2u_hub.pth`` at the top of site-packages.

The ``site`` module runs that file at every interpreter start (see ``p2u_hub/_startup.py``), which
is how transformers learns the "p2u" quantizer without users importing p2u_hub. setuptools has no
declarative option for it: package data lands inside the package and data files under
``sys.prefix``. All metadata stays in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

START_UP_FILE = Path("p2u_hub", "p2u_hub.pth")


class BuildPyWithStartUpFile(build_py):
    """Also copy the .pth beside the packages: into build_lib for a wheel, into the wheel root for ``pip install -e``.

    An editable wheel holds no package files, only what is written to its root (setuptools points
    the ``install`` command's ``install_lib`` there while it builds one).
    """

    def run(self) -> None:
        super().run()
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(str(START_UP_FILE), str(Path(target, START_UP_FILE.name)))


setup(cmdclass={"build_py": BuildPyWithStartUpFile})
