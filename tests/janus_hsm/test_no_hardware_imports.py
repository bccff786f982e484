"""janus_hsm stands alone: it imports nothing from ``hardware/`` (test devices), so an
install without that directory works; the test-only software authenticator is
registered from outside (an entry point, see janus_hsm/fido2/devices.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import janus_hsm

PACKAGE = Path(janus_hsm.__file__).parent


def _imported_names(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):  # every import, also those inside functions
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and node.args:  # importlib.import_module("…")
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("import_module", "__import__"):
                    names.append(first.value)
    return names


def test_no_module_of_janus_hsm_imports_hardware() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in _imported_names(ast.parse(path.read_text(), str(path))):
            if name == "hardware" or name.startswith("hardware."):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {name}")
    assert offenders == []


def test_importing_every_module_of_janus_hsm_loads_no_hardware_module() -> None:
    script = """
import importlib, pkgutil, sys
import janus_hsm
for info in pkgutil.walk_packages(janus_hsm.__path__, "janus_hsm."):
    importlib.import_module(info.name)
from janus_hsm.fido2 import devices
devices.list_devices()  # discovery without the test variables set
loaded = sorted(m for m in sys.modules if m == "hardware" or m.startswith("hardware."))
print(",".join(loaded))
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_software_authenticator_is_registered_from_outside() -> None:
    from importlib.metadata import entry_points

    from janus_hsm.fido2.devices import SOFTWARE_AUTHENTICATOR_GROUP

    (entry,) = entry_points(group=SOFTWARE_AUTHENTICATOR_GROUP)
    assert entry.value.startswith("hardware.")
