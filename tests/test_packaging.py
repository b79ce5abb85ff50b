"""
sslshare as a user installs it: the wheel built from this tree
(pyproject.toml, C{pip wheel}) installed in a fresh venv, and its commands
run from a directory that is no checkout.

Nothing is downloaded: the wheel is built with this venv's setuptools
(C{--no-build-isolation}), installed without its dependencies, and the
fresh venv reads those from this venv's site-packages through a C{.pth}
line (a plain path: the C{.pth} files there, such as the development
install's, are not read, so the checkout stays out of reach).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

from twisted.trial.unittest import TestCase

from sslshare import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(command, cwd):
    """
    C{command} in C{cwd}, with neither this venv nor the checkout on its
    path: trial's workers get the test process's path as C{PYTHONPATH},
    and pip would find this venv's sslshare through it and install none.
    """
    environment = dict(os.environ)
    environment.pop("PYTHONPATH", None)
    environment.pop("VIRTUAL_ENV", None)
    return subprocess.run(command, cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


class _Installed:
    """
    The wheel of this tree, and a fresh venv with it installed.
    """

    def __init__(self, directory):
        self.directory = directory
        source = os.path.join(directory, "source")
        # A copy, so that no build/ left in the checkout by an earlier
        # build can add files the tree no longer has.
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "_trial_temp*",
            "demo", "__pycache__", "dropin.cache", ".mypy_cache"))
        wheels = os.path.join(directory, "wheels")
        built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                      "--no-build-isolation", "--wheel-dir", wheels, "."],
                     source)
        if built.returncode != 0:
            raise AssertionError(f"pip wheel failed:\n{built.stdout}"
                                 f"{built.stderr}")
        (name,) = os.listdir(wheels)
        self.wheel = os.path.join(wheels, name)
        venv = os.path.join(directory, "venv")
        made = _run([sys.executable, "-m", "venv", "--without-pip", venv],
                    directory)
        if made.returncode != 0:
            raise AssertionError(f"venv failed: {made.stderr}")
        self.python = os.path.join(venv, "bin", "python")
        installed = _run([sys.executable, "-m", "pip", "--python",
                          self.python, "install", "--no-deps",
                          "--no-index", self.wheel], directory)
        if installed.returncode != 0:
            raise AssertionError(f"pip install failed:\n{installed.stdout}"
                                 f"{installed.stderr}")
        site = _run([self.python, "-c", "import sysconfig; "
                     "print(sysconfig.get_path('purelib'))"], directory)
        with open(os.path.join(site.stdout.strip(), "dependencies.pth"),
                  "w") as f:
            f.write(sysconfig.get_path("purelib") + "\n")
        self.bin = os.path.join(venv, "bin")
        self.elsewhere = os.path.join(directory, "elsewhere")
        os.makedirs(self.elsewhere)

    def run(self, *command):
        """
        C{command} (a program of the fresh venv, or C{python}) in a
        directory that is no checkout.
        """
        program = (self.python if command[0] == "python"
                   else os.path.join(self.bin, command[0]))
        return _run([program, *command[1:]], self.elsewhere)


_installed: list[_Installed] = []


class WheelTests(TestCase):
    """
    One wheel and venv for every test (trial runs no setUpClass), made in
    the trial run's directory, which goes with it.
    """

    def setUp(self):
        if not _installed:
            _installed.append(_Installed(tempfile.mkdtemp(
                prefix="wheel-", dir=os.getcwd())))
        self.installed = _installed[0]

    def assertRuns(self, *command):
        result = self.installed.run(*command)
        self.assertEqual(result.returncode, 0,
                         f"{command}: {result.stdout}{result.stderr}")
        return result.stdout

    def test_the_package_comes_from_the_wheel(self):
        where = self.assertRuns("python", "-c",
                                "import sslshare; print(sslshare.__file__)")
        self.assertTrue(where.startswith(self.installed.directory), where)

    def test_every_package_and_example_is_in_the_wheel(self):
        with zipfile.ZipFile(self.installed.wheel) as wheel:
            names = set(wheel.namelist())
        expected = set()
        for top in ("sslshare", os.path.join("twisted", "plugins")):
            for directory, subdirectories, files in os.walk(
                    os.path.join(ROOT, top)):
                subdirectories[:] = [d for d in subdirectories
                                     if d != "__pycache__"]
                for name in files:
                    if not name.endswith((".pyc", ".cache")):
                        expected.add(os.path.relpath(
                            os.path.join(directory, name), ROOT))
        self.assertEqual(sorted(expected - names), [])
        self.assertIn("sslshare/examples/example.toml", names)

    def test_license_in_the_metadata(self):
        with zipfile.ZipFile(self.installed.wheel) as wheel:
            (metadata,) = [name for name in wheel.namelist()
                           if name.endswith(".dist-info/METADATA")]
            text = wheel.read(metadata).decode("utf-8")
            (license_file,) = [name for name in wheel.namelist()
                               if name.endswith("/licenses/LICENSE")]
            self.assertIn(b"MIT License", wheel.read(license_file))
        self.assertIn("License-Expression: MIT\n", text)
        self.assertIn(f"Version: {__version__}\n", text)

    def test_twistd_finds_the_plugin(self):
        output = self.assertRuns(
            "python", "-c", "from twisted.scripts.twistd import run; run()",
            "sslshare", "--help")
        self.assertIn("--config", output)

    def test_sslshare_help_and_version(self):
        self.assertIn("COMMAND", self.assertRuns("sslshare", "--help"))
        self.assertEqual(self.assertRuns("sslshare", "--version"),
                         f"sslshare {__version__}\n")

    def test_python_m_sslshare(self):
        self.assertIn("COMMAND", self.assertRuns("python", "-m", "sslshare",
                                                 "--help"))

    def test_config_example_prints_the_example(self):
        with open(os.path.join(ROOT, "sslshare", "examples", "example.toml"),
                  encoding="utf-8") as f:
            self.assertEqual(self.assertRuns("sslshare", "config", "example"),
                             f.read())

    def test_twistd_sslshare_without_config_prints_its_usage(self):
        result = self.installed.run(
            "python", "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "sslshare")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn("Usage: ", output)
        self.assertIn("--config FILE is required", output)
        self.assertNotIn("Traceback", output)
