"""Where the files rlnf ships beside its code live: recipes, YAML configs and the demo's sentences.

    recipes/*.py            rlnf/recipes/*.py in an installed wheel
    configs/**/*.yaml       rlnf/configs/**/*.yaml in an installed wheel
    rlnf/data/sentences.txt the same in both (and rlnf/data/everyday_sentences.txt)

The repository keeps ``recipes/`` and ``configs/`` at its top level (torchtune's layout: a user
reads them beside the code); ``pyproject.toml`` maps both into the ``rlnf`` package when a wheel
is built. A checkout (editable install, or ``PYTHONPATH``) has no ``rlnf/configs``, so the folder
beside the package is used there. This module is the only place that knows either layout.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from rlnf.errors import RlnfError

# In a checkout, the parent of the rlnf package folder.
_CHECKOUT = Path(__file__).resolve().parents[1]


def _folder(name: str) -> Path:
    packaged = importlib.resources.files("rlnf") / name
    if packaged.is_dir():  # an installed wheel
        # rlnf is installed as plain files (never zipped), so the Traversable is a real path that
        # OmegaConf, glob and importlib's file loader can use.
        return Path(str(packaged))
    beside = _CHECKOUT / name
    if beside.is_dir():  # a checkout
        return beside
    raise RlnfError(f"rlnf's {name}/ folder is missing: looked in {packaged} (installed wheel) and {beside} "
                    "(checkout); reinstall rlnf")


def recipes_dir() -> Path:
    """The shipped recipes, one ``NAME.py`` each (``rlnf run NAME``)."""
    return _folder("recipes")


def configs_dir() -> Path:
    """The shipped YAML configs, named by their path below this folder (``--config rl/grpo``)."""
    return _folder("configs")


def sentences_file() -> Path:
    """The public-domain sentences the speech synthesiser reads (``rlnf data synth``, the demo)."""
    return Path(str(importlib.resources.files("rlnf.data") / "sentences.txt"))


def everyday_sentences_file() -> Path:
    """Everyday modern English written for rlnf: the demo's other-text test set (``other_text_corpus``)."""
    return Path(str(importlib.resources.files("rlnf.data") / "everyday_sentences.txt"))
