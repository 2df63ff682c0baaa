"""No folder or module at the repository root may shadow an installed distribution's import name.

Every script of this project runs from the repository root (``python pretrain_anyflow.py``,
``python tools/generate.py``), so the root is first on ``sys.path``. A regular package there (a folder with
``__init__.py``) or a module (``name.py``) wins over site-packages: in 2026-12 the project's own
``kernels/__init__.py`` shadowed the PyPI distribution ``kernels`` that transformers >= 5.25 imports from
``transformers.activations``, and the main job failed at its second step for everyone who installed that
day. A folder *without* ``__init__.py`` is only a namespace-package portion, which the import system uses
only when no regular package or module of that name exists anywhere on the path, so it cannot shadow one.
"""

import importlib.metadata
import os
import subprocess
import sys

from conftest import REPO

# The distributions this repository itself installs (their top-level names may live at the root).
OWN_DISTRIBUTIONS = {"megatron_anyflow", "megatron-anyflow"}


def _root_import_names():
    """{name: kind} for what ``import name`` could find at the repository root.

    kind: ``"package"`` (folder with ``__init__.py``), ``"module"`` (``name.py``) or ``"namespace"`` (a folder
    without ``__init__.py``; it can never shadow an installed package or module).
    """
    names = {}
    for entry in sorted(os.listdir(REPO)):
        path = os.path.join(REPO, entry)
        if entry.startswith(".") or entry == "__pycache__":
            continue
        if os.path.isdir(path) and entry.isidentifier():
            names[entry] = "package" if os.path.exists(os.path.join(path, "__init__.py")) else "namespace"
        elif entry.endswith(".py") and entry[:-3].isidentifier():
            names[entry[:-3]] = "module"
    return names


def test_no_root_name_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()  # top-level import name -> [distribution, ...]
    names = _root_import_names()
    assert {"megatron_anyflow", "kernels", "tools", "tests"} <= set(names), names
    shadowing = {}
    for name, kind in names.items():
        owners = set(installed.get(name, [])) - OWN_DISTRIBUTIONS
        if owners and kind != "namespace":
            shadowing[name] = (kind, sorted(owners))
    assert not shadowing, (
        f"the repository root holds importable names that installed distributions own: {shadowing}; "
        f"scripts run from the root would import the project's file instead of the distribution's")


def test_only_the_library_is_a_regular_package_at_the_root():
    # Independent of what happens to be installed today: tools/, tests/, benchmarks/, examples/, kernels/
    # stay plain folders, so no future distribution of the same name can be shadowed by them.
    packages = {n for n, kind in _root_import_names().items() if kind == "package"}
    assert packages == {"megatron_anyflow"}, packages


def test_dependencies_import_from_the_repository_root():
    """transformers.activations (imports the PyPI ``kernels``), diffusers and ``kernels`` itself, with the
    root first on the path exactly as for ``python pretrain_anyflow.py``."""
    code = (
        "import sys, os; sys.path.insert(0, os.getcwd())\n"
        "import transformers.activations, diffusers, kernels, megatron_anyflow_kernels\n"
        "print(kernels.__file__); print(megatron_anyflow_kernels.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file, ours_file = proc.stdout.split()[-2:]
    assert kernels_file != "None" and not os.path.realpath(kernels_file).startswith(os.path.realpath(REPO) + os.sep), (
        f"`import kernels` from the repository root resolved to {kernels_file}, not the installed distribution")
    assert os.path.realpath(ours_file).startswith(os.path.join(os.path.realpath(REPO), "kernels", ""))
