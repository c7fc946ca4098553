"""The wheel's package list names every package directory of the source tree."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {source: package for package, source in config["package-dir"].items()}
    found = set()
    for top in ("discache", "integrations"):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            prefix = mapped.get(parts[0], parts[0])
            found.add(".".join((prefix,) + parts[1:]))
    assert found == set(config["packages"])
    assert config["package-dir"] == {"discache.integrations": "integrations"}
