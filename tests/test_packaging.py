"""pyproject.toml: the package builds offline and `import fpcd` works from an installed copy, anywhere."""

import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = {"build", "dist", "workdirs", "runs"}  # never part of a source tree to install


def _python_files(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
            if f.endswith(".py")}


def test_installed_copy_imports_from_another_directory_without_the_repository(tmp_path):
    # Build from a copy of the source tree, so that setuptools' build/ and fpcd.egg-info stay out of the repository.
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    for name in os.listdir(REPO):
        path = os.path.join(REPO, name)
        if name.startswith(".") or name in OUTPUTS or name.endswith(".egg-info"):
            continue
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy2(path, src / name)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--check-build-dependencies",
         "--no-index", "--no-cache-dir", "--target", str(site), str(src)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert install.returncode == 0, ("building needs setuptools>=70.1 in this environment (pinned in "
                                     "requirements.txt)\n" + install.stdout[-3000:] + install.stderr[-3000:])

    installed = sorted(os.listdir(site))
    assert installed[:2] == ["bin", "fpcd"] and installed[2].startswith("fpcd-"), installed
    assert installed[2].endswith(".dist-info") and len(installed) == 3, installed  # no experiments/, tests/, benchmarks/
    assert os.listdir(site / "bin") == ["fpcd"]  # the console script
    assert "from fpcd.cli import run" in (site / "bin" / "fpcd").read_text()
    assert _python_files(site / "fpcd") == _python_files(src / "fpcd")  # every module, namespace packages too
    binning = sorted(os.listdir(site / "fpcd" / "data" / "calochallenge_binning"))  # package data
    assert binning == sorted(os.listdir(src / "fpcd" / "data" / "calochallenge_binning")) and len(binning) == 4, binning

    probe = (
        "import importlib.metadata, json, sys\n"
        "import fpcd, fpcd.sampling\n"
        "print(json.dumps({'file': fpcd.__file__, 'sampling': fpcd.sampling.__file__, 'path': sys.path,\n"
        "                  'version': fpcd.__version__, 'dist': importlib.metadata.version('fpcd')}))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=elsewhere,
                         env=dict(env, PYTHONPATH=str(site), JAX_PLATFORMS="cpu"), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    repo = os.path.realpath(REPO)
    assert not [p for p in found["path"] if os.path.realpath(p or str(elsewhere)) == repo], found["path"]
    for module in ("file", "sampling"):
        assert os.path.realpath(found[module]).startswith(os.path.realpath(site) + os.sep), found
    assert found["dist"] == found["version"]  # the version comes from fpcd.__version__

    script = subprocess.run([sys.executable, str(site / "bin" / "fpcd"), "--mode=train"], capture_output=True,
                            text=True, cwd=elsewhere, env=dict(env, PYTHONPATH=str(site)), timeout=300)
    assert script.returncode == 1 and script.stderr.strip().splitlines() == [
        "error: --config is required, e.g. --config=experiments/gmm.py"], script.stderr[-3000:]


def test_package_exports_load_on_first_use_without_starting_jax():
    probe = (
        "import sys, fpcd\n"
        "assert 'jax' not in sys.modules, 'import fpcd started JAX'\n"
        "import importlib\n"
        "for name in fpcd.__all__:\n"
        "    if name != '__version__':\n"
        "        assert getattr(fpcd, name) is getattr(importlib.import_module(fpcd._EXPORTS[name]), name), name\n"
        "try:\n"
        "    fpcd.no_such_name\n"
        "except AttributeError as err:\n"
        "    assert 'no_such_name' in str(err)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
