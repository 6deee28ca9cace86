"""Print one optional-dependency group of pyproject.toml, one requirement per line.

The Makefile installs the `ha` extra into a second virtualenv with this, so its pins are
written once, in pyproject.toml."""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
print("\n".join(project["project"]["optional-dependencies"][sys.argv[1]]))
