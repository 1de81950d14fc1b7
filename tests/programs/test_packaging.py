"""What a user reads about the package agrees with the package: its metadata (URLs, classifiers,
typing marker), the transformers floor the Trainer recipe needs, the commands the README names,
and the version that the CHANGELOG and the package state."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import metadata

import pytest

import llaca_optim
from llaca_optim import _build

ROOT = _build.PACKAGE_DIR.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_metadata_has_urls_classifiers_and_the_typing_marker():
    meta = metadata("llaca_optim")
    assert meta.get_all("Project-URL"), "no project URLs"
    classifiers = meta.get_all("Classifier") or []
    for wanted in ("License :: OSI Approved :: Apache Software License", "Typing :: Typed",
                   "Programming Language :: Python :: 3"):
        assert wanted in classifiers
    assert (_build.PACKAGE_DIR / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["llaca_optim"]
    supported = [c.rsplit(" ", 1)[-1] for c in classifiers if re.fullmatch(r".*Python :: 3\.\d+", c)]
    floor = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert supported and min(supported, key=lambda v: tuple(map(int, v.split(".")))) == floor


def test_the_transformers_floor_is_the_one_the_trainer_recipe_needs():
    """pyproject.toml's floor is the integration's (optimizer_cls_and_kwargs came with 4.47);
    the installed Trainer takes the argument; an older transformers is refused at import,
    saying which version is needed."""
    transformers = pytest.importorskip("transformers")
    from llaca_optim.integrations import huggingface

    extras = PYPROJECT["project"]["optional-dependencies"]
    floors = {spec.split(">=")[1] for specs in extras.values() for spec in specs
              if spec.startswith("transformers")}
    assert floors == {huggingface.MIN_TRANSFORMERS}
    import inspect

    assert "optimizer_cls_and_kwargs" in inspect.signature(transformers.Trainer.__init__).parameters
    older = subprocess.run(
        [sys.executable, "-c", "import transformers; transformers.__version__ = '4.46.3'\n"
                               "import llaca_optim.integrations.huggingface"],
        capture_output=True, text=True, timeout=300)
    assert older.returncode != 0
    assert f"transformers>={huggingface.MIN_TRANSFORMERS}" in older.stderr and "4.46.3" in older.stderr


def test_the_readme_names_the_installed_commands():
    readme = (ROOT / "README.md").read_text()
    for command in PYPROJECT["project"]["scripts"]:
        assert f"`{command}" in readme, command


def test_the_changelog_and_the_version_agree():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\S+)", changelog, re.MULTILINE)
    assert newest is not None and newest.group(1) == llaca_optim.__version__
