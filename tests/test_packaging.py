"""Packaging rules: the base install is the SDK and CLI, and importing them loads nothing heavy.

CI also proves the first rule for real: .ci/run installs `pip install .` alone into a fresh venv
and imports paletta and paletta.cli there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "diffusers", "transformers", "numpy", "paletta_server", "nicegui", "tqdm")


def _pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_importing_the_sdk_and_cli_loads_no_torch_server_or_webui():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("client", "server", "webui"))}
    script = (
        "import sys, paletta, paletta.cli, paletta.aio\n"
        "paletta.cli.app.commands  # every command registered\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cli_help_runs_without_the_server_extra():
    """`paletta --help` is a base-install command: it must not need what only [server] brings."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "client")}
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {HEAVY!r}: raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from paletta import cli\n"
        "sys.exit(cli.main(['--help']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "serve" in done.stdout


def test_the_page_without_its_extra_says_what_to_install():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("client", "webui"))}
    script = ("import sys, runpy\nsys.modules['nicegui'] = None  # as if it were not installed\n"
              "runpy.run_module('paletta_webui', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "the page is not installed (nicegui is missing): pip install 'paletta[webui]'"


def test_base_install_is_the_sdk_and_extras_hold_the_rest():
    project = _pyproject()["project"]
    base = _names(project["dependencies"])
    assert base == {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos", "pillow", "click", "rich"}
    extras = project["optional-dependencies"]
    assert {"torch", "torchvision", "diffusers", "transformers", "sqlalchemy", "isal", "onnx"} <= _names(
        extras["server"]
    )
    assert _names(extras["webui"]) == {"nicegui"}
    assert _names(extras["turbo"]) == {"paletta", "torchao"}  # float8 for the turbo profile, opt-in
    assert "paletta[server,webui,turbo]" in extras["dev"]
    assert {"pytest", "mypy", "types-grpcio", "types-protobuf", "googleapis-common-protos-stubs"} <= _names(
        extras["dev"]
    )
    assert project["requires-python"] == ">=3.11"


def test_heavy_requirements_are_ranges_not_pins():
    extras = _pyproject()["project"]["optional-dependencies"]
    for requirement in extras["server"]:
        assert "==" not in requirement, requirement
    torch = next(r for r in extras["server"] if r.startswith("torch>"))
    assert "<2.15" in torch


def test_the_server_extra_covers_every_third_party_import_of_the_server():
    """Each top-level module the server imports comes from the standard library or the server extra."""
    provided_by = {  # import name → distribution
        "PIL": "pillow", "cv2": "opencv-python-headless", "grpc": "grpcio", "grpc_status": "grpcio-status",
        "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
        "google": "protobuf", "sqlalchemy": "sqlalchemy", "pynvml": "nvidia-ml-py", "huggingface_hub":
        "huggingface-hub", "onnxruntime": "onnxruntime",
    }
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    # torchao is imported only for float8 under the turbo profile (its own extra)
    installed = _names(project["dependencies"]) | _names(extras["server"]) | _names(extras["turbo"])
    imports: set[str] = set()
    for path in (ROOT / "server" / "paletta_server").rglob("*.py"):
        for match in re.finditer(r"^\s*(?:from|import) ([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), re.M):
            imports.add(match.group(1))
    third_party = {m for m in imports if m not in sys.stdlib_module_names and m not in ("paletta", "paletta_server")}
    missing = {m for m in third_party if provided_by.get(m, m.replace("_", "-").lower()) not in installed}
    assert missing == set()
