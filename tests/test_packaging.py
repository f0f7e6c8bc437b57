"""Packaging lint, for machines without a container engine: the Dockerfile installs extras that exist and
everything the demo and the tests use, through the same scripts as CI, as a non-root user; the tested
versions (constraints.txt) lie inside pyproject.toml's ranges; the license file is the one declared."""
from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CONSTRAINTS = ROOT / "constraints.txt"
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, byte for byte
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
NOT_PINNED_EXTRAS = {"gpu"}  # flash-attn builds against the user's own torch and CUDA: never in the tested stack


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def code(shell: str) -> str:
    """A shell text without its comments."""
    return "\n".join(line.split(" #")[0] for line in shell.splitlines() if not line.lstrip().startswith("#"))


def installed_extras(shell: str) -> set[str]:
    """Extras a shell text installs: `setup_venv.sh EXTRAS`, `pip install ... .[EXTRAS]`, and those of
    scripts/demo.sh when it runs that."""
    shell = code(shell)
    groups = re.findall(r"scripts/setup_venv\.sh\s+([\w,-]+)", shell)
    groups += re.findall(r"pip install[^&;\n]*?\.\[([\w,-]+)\]", shell)
    extras = {extra for group in groups for extra in group.split(",")}
    if re.search(r"bash scripts/demo\.sh", shell):
        extras |= installed_extras((ROOT / "scripts" / "demo.sh").read_text())
    return extras


def image_extras() -> set[str]:
    return installed_extras("\n".join(args for op, args in instructions(ROOT / "Dockerfile") if op == "RUN"))


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exact versions: {line}"
            assert canonicalize_name(req.name) not in out, f"{req.name} pinned twice"
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def test_the_image_installs_existing_extras_covering_the_tests_and_the_demo():
    extras = image_extras()
    declared = set(PROJECT["optional-dependencies"])
    assert extras - declared == set(), "the Dockerfile installs extras pyproject.toml does not declare"
    tested = installed_extras((ROOT / "scripts" / "test.sh").read_text())
    assert tested == {"dev", "eval", "demo"}
    assert tested <= extras, "the image lacks extras the tests install"
    runs = [args for op, args in instructions(ROOT / "Dockerfile") if op == "RUN"]
    assert "gpu" not in extras and not any("flash" in r for r in runs), "no flash-attn in the image (README)"
    assert any("DEMO_INSTALL_ONLY=1 bash scripts/demo.sh" in r for r in runs), "the demo's data packages"


def test_the_install_layer_copies_every_file_the_install_reads():
    """Dependencies install before the source is copied (layer cache): what pip and the scripts read then
    must already be there, or the build fails (e.g. the license file the metadata names)."""
    steps = instructions(ROOT / "Dockerfile")
    install = next(i for i, (op, args) in enumerate(steps) if op == "RUN" and "setup_venv.sh" in args)
    copied = {src for op, args in steps[:install] if op == "COPY"
              for src in [w for w in shlex.split(args) if not w.startswith("--")][:-1]}
    needed = {"pyproject.toml", "setup.py", PROJECT["readme"], *PROJECT["license-files"], CONSTRAINTS.name,
              "scripts/setup_venv.sh", "scripts/demo.sh", "drprune/__init__.py"}
    assert needed - copied == set()
    assert any(op == "COPY" and args.split()[-2:] == [".", "."] for op, args in steps[install:])


def test_the_image_runs_as_a_user_with_the_venv_on_path():
    steps = instructions(ROOT / "Dockerfile")
    users = [args.split(":")[0] for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    workdir = [args for op, args in steps if op == "WORKDIR"][-1]
    assert any(op == "ENV" and f"{workdir}/.venv/bin" in args for op, args in steps)
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "demo-out", ".pytest_cache"} <= ignored


def test_ci_the_demo_and_the_image_install_with_the_constraints():
    script = (ROOT / "scripts" / "setup_venv.sh").read_text()
    installs = [line for line in script.splitlines() if "pip install" in line and "-e" in line]
    assert installs and all(f"-c {CONSTRAINTS.name}" in line for line in installs)


def test_every_requirement_is_a_range_the_tested_pin_satisfies():
    pinned = pins()
    requirements = [(None, r) for r in PROJECT["dependencies"]]
    requirements += [(extra, r) for extra, reqs in PROJECT["optional-dependencies"].items() for r in reqs]
    for extra, line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert not any(s.operator == "==" for s in req.specifier), f"{line}: a range; the exact version goes " \
                                                                  "to constraints.txt"
        if extra in NOT_PINNED_EXTRAS:
            continue
        assert name in pinned, f"{line} ({extra or 'dependencies'}): pin the tested version in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is outside {line}"


def test_torch_range_admits_gpu_image_builds_within_composers_bounds():
    """Composer 0.32.1 requires torch>=2.6.0,<2.7.1; NGC images ship pre-release builds such as 2.7.0a0,
    which pip accepts as installed (pre-releases allowed)."""
    (line,) = [r for r in PROJECT["dependencies"] if canonicalize_name(Requirement(r).name) == "torch"]
    spec = Requirement(line).specifier
    admitted = ["2.6.0", "2.7.0", "2.7.0+cu126", "2.7.0a0+7c8ec84dab.nv25.03"]
    refused = ["2.5.1", "2.7.1", "2.8.0"]
    assert [spec.contains(v, prereleases=True) for v in admitted + refused] == [True] * 4 + [False] * 3
    assert pins()["torch"] == Version("2.7.0")


def test_license_file_is_the_declared_license():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256


def test_readme_gpu_installs_build_without_isolation():
    """flash-attn imports torch in its build, so an isolated build environment (no torch) fails."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if "pip install" in line and "gpu]" in line]
    assert lines and all("--no-build-isolation" in line for line in lines)
