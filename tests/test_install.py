"""The locked install: pyproject.toml and uv.lock agree, torch and torchaudio are one exact pair in both, drift stops
`make` with one line naming the fix, and the install check names a module that fails to import."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra"))
import check_install  # noqa: E402  (infra/ is not a package: the script runs before anything else is trusted)

DRIFT = 'uv.lock does not match pyproject.toml: run "make lock" and commit uv.lock'


def _uv() -> Path:
    version = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    uv = ROOT / ".tools" / f"uv-{version}" / "bin" / "uv"
    assert uv.exists(), f"{uv} is installed by `make install`, which every test target runs first"
    return uv


def _locked_versions() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"] if "version" in package}


def test_torch_and_torchaudio_are_one_exact_pair_in_pyproject_and_lock():
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {m.group(1): m.group(2) for r in requirements if (m := re.fullmatch(r"(torch|torchaudio)==([\d.]+)", r))}
    assert set(pins) == {"torch", "torchaudio"}, f"torch and torchaudio must be pinned with ==, found {requirements}"
    assert pins["torch"] == pins["torchaudio"]  # torchaudio's release train follows torch's version number
    locked = _locked_versions()
    assert (locked["torch"], locked["torchaudio"]) == (pins["torch"], pins["torchaudio"])


def test_dagster_packages_are_one_release_pinned_exactly_in_pyproject_and_lock():
    # the libraries of a Dagster release are numbered 0.(minor + 16).patch beside dagster 1.minor.patch and pin it
    # exactly; unpinned, the resolver pairs the newest dagster with a 2021 dagster-postgres that breaks at run time
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    family = r"(dagster|dagster-webserver|dagster-postgres)"
    pins = {m.group(1): m.group(2) for r in requirements if (m := re.fullmatch(family + r"==([\d.]+)", r))}
    assert set(pins) == {"dagster", "dagster-webserver", "dagster-postgres"}, requirements
    assert not [r for r in requirements if r.startswith("dagster") and "==" not in r]
    major, minor, patch = pins["dagster"].split(".")
    assert major == "1" and pins["dagster-webserver"] == pins["dagster"]
    assert pins["dagster-postgres"] == f"0.{int(minor) + 16}.{patch}"
    locked = _locked_versions()
    assert {name: locked[name] for name in pins} == pins
    # dagster's own parts move with it (dagster-pipes, dagster-shared, dagster-graphql: the same 1.x.y)
    assert {locked[name] for name in ("dagster-pipes", "dagster-shared", "dagster-graphql")} == {pins["dagster"]}


def test_lock_pins_every_package_exactly_with_hashes():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    registry = [p for p in lock["package"] if "registry" in p.get("source", {})]
    assert len(registry) > 150  # the whole stack, transitive dependencies and the dev extra included
    names = {p["name"] for p in registry}
    assert {"pytest", "playwright", "ray", "apache-beam", "great-expectations", "tinysoundfont"} <= names
    assert "pyaudio" not in names  # tinysoundfont's live playback, overridden away
    for package in registry:
        artifacts = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert artifacts and all(a["hash"].startswith("sha256:") for a in artifacts), package["name"]


def test_lock_matches_pyproject():
    done = subprocess.run([_uv(), "lock", "--check", "--offline", "--python", sys.executable], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_pyproject_out_of_step_with_the_lock_stops_make_with_one_line(tmp_path):
    for name in ("Makefile", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"scipy>=1.11"', '"scipy>=1.12"'))
    done = subprocess.run(["make", "--no-print-directory", "check-lock", f"UV={_uv()}", f"PYTHON={sys.executable}"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.splitlines()[0] == DRIFT
    # and the unchanged pair passes the same check
    shutil.copy(ROOT / "pyproject.toml", pyproject)
    done = subprocess.run(["make", "--no-print-directory", "check-lock", f"UV={_uv()}", f"PYTHON={sys.executable}"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_install_check_lists_every_module_of_the_four_packages():
    names = check_install.module_names(ROOT)
    assert {"provenance.records", "cleaning.separate", "training.config", "pipelines.cli"} <= set(names)
    on_disk = {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".") for package in check_install.PACKAGES
               for p in (ROOT / package).rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert on_disk <= set(names)


def test_install_check_names_a_broken_module_and_its_error_on_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_binary_dependency.py").write_text(
        "raise OSError('libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace\\nmore')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    failures = check_install.import_failures(["provenance.records", "broken_binary_dependency"])
    assert failures == ["broken_binary_dependency: OSError: libtorchaudio.so: undefined symbol: "
                        "torch_exception_get_what_without_backtrace"]


def test_make_install_reinstalls_only_when_the_lock_or_pyproject_changes():
    make = ["make", "--no-print-directory", "-n", "install"]
    unchanged = subprocess.run(make, cwd=ROOT, capture_output=True, text=True)
    assert unchanged.returncode == 0 and "uv sync" not in unchanged.stdout, unchanged.stdout  # nothing to do
    for changed in ("uv.lock", "pyproject.toml"):  # -W: as if the file had just been touched (nothing is run)
        touched = subprocess.run([*make, "-W", changed], cwd=ROOT, capture_output=True, text=True)
        assert "sync --frozen" in touched.stdout and "check_install.py" in touched.stdout, touched.stdout
