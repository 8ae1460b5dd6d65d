"""What a regular (non-editable) install ships: every kcap subpackage and data file must be
listed in pyproject.toml, or `pip install .` silently leaves it out (kcap.models once was)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kcap").rglob("__init__.py")}
    found |= {"kcap.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert found <= listed, f"missing from pyproject.toml packages: {sorted(found - listed)}"
    assert tool["package-dir"]["kcap.kernels"] == "kernels"
