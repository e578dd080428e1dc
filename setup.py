"""Two build steps pyproject.toml cannot declare: ``p2u_hub.pth`` at the top of site-packages, and
the optional C extension of the codec.

The ``site`` module runs that file at every interpreter start (see ``p2u_hub/_startup.py``), which
is how transformers learns the "p2u" quantizer without users importing p2u_hub. setuptools has no
declarative option for it: package data lands inside the package and data files under
``sys.prefix``. All metadata stays in pyproject.toml.

``p2u_hub.codecs._native`` (std C, the CPython API only) runs the entropy coder's hot loops; it is
``optional``: without a C compiler the install still succeeds and the codec uses its numpy path,
which writes and reads the same bytes. ``-ffp-contract=off`` keeps every float operation rounded on its
own (no fused multiply-add), as numpy rounds it; ``-fno-trapping-math`` lets the compiler vectorise
float comparisons (the grid search) without changing any result.
"""

from pathlib import Path

from setuptools import Extension, setup
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


setup(
    cmdclass={"build_py": BuildPyWithStartUpFile},
    ext_modules=[
        Extension(
            "p2u_hub.codecs._native",
            ["p2u_hub/codecs/_native.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"],
            optional=True,
        )
    ],
)
