"""What a wheel ships: every package directory is listed, and `discache bench` runs from an
installed copy (no source checkout around) as from a checkout."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the [test] extra installs tomli there
    import tomli as tomllib

import discache._core

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAPPED = {"discache.integrations": "integrations", "discache.bench": "bench"}


def test_every_package_directory_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {source: package for package, source in config["package-dir"].items()}
    found = set()
    for top in ("discache", *MAPPED.values()):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            prefix = mapped.get(parts[0], parts[0])
            found.add(".".join((prefix,) + parts[1:]))
    assert found == set(config["packages"])
    assert config["package-dir"] == MAPPED


def install_like_a_wheel(target: pathlib.Path) -> pathlib.Path:
    """The files a wheel installs, laid out by setuptools' build_py (packages, package-dir,
    package data from pyproject.toml) into target, with the compiled modules built in place."""
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                            str(target)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = sorted((ROOT / "discache").rglob(f"*{suffix}"))
    assert pathlib.Path(discache._core.__file__) in built, "the compiled core is built in place"
    for extension in built:  # every compiled module of this interpreter, where the wheel puts it
        shutil.copy2(extension, target / extension.relative_to(ROOT))
    return target


def test_the_wheel_ships_the_benchmarks_and_the_integrations(tmp_path):
    site = install_like_a_wheel(tmp_path / "site")
    for name in ("bench_pagetable.py", "bench_cache.py", "bench_imagecache.py", "conftest.py"):
        assert (site / "discache" / "bench" / name).is_file(), name
    for name in ("discache-rules.yml", "rules-test.yml", "grafana-dashboard.json"):
        assert (site / "discache" / "integrations" / "prometheus" / name).is_file(), name


def test_discache_bench_runs_from_an_installed_copy(tmp_path):
    site = install_like_a_wheel(tmp_path / "site")
    work = tmp_path / "elsewhere"  # no bench/ here, no checkout above
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-m", "discache", "bench", "--only", "unmark",
                             "--quick", "--no-plots", "--out", str(work / "report")],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"from {site / 'discache' / 'bench'}" in result.stderr, "the installed benchmarks ran"
    assert "not found" not in result.stderr
    data = json.loads((work / "report" / "bench.json").read_text())
    assert data["discache"]["groups"] == ["unmark"] and data["benchmarks"]
    assert "| unmark | 0 | token |" in (work / "report" / "report.md").read_text()
