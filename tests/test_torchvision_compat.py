"""The torchvision repair acts only when torchvision's own import fails, and then makes it importable: through
vitpool's imports, and through the start-up hook for code that imports timm first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vitpool._torchvision_compat import HOOK_FILE, ensure_torchvision, is_missing_op_error, write_hook_if_needed

README = Path(__file__).resolve().parents[1] / "README.md"
NO_HOOK = {**os.environ, "VITPOOL_NO_TORCHVISION_HOOK": "1"}


def test_only_the_missing_operator_error_is_recognised():
    assert is_missing_op_error(RuntimeError("operator torchvision::nms does not exist"))
    assert not is_missing_op_error(RuntimeError("CUDA out of memory"))
    assert not is_missing_op_error(ImportError("operator torchvision::nms does not exist"))


def _python(code: str, env: dict | None = NO_HOOK, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # timeout: a hang guard only
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env, cwd=cwd)


def test_repair_runs_exactly_when_the_plain_import_fails():
    plain = _python("import torchvision")
    repaired = _python(
        "from vitpool._torchvision_compat import ensure_torchvision\n"
        "print(ensure_torchvision())\n"
        "import torch, torchvision.transforms\n"
        "print(torch.ops.torchvision.nms.default._schema.name)\n"
    )
    assert repaired.returncode == 0, repaired.stderr
    acted, schema = repaired.stdout.split()
    assert acted == str(plain.returncode != 0)
    assert schema == "torchvision::nms"


def test_repair_is_idempotent_in_one_process():
    ensure_torchvision()
    assert ensure_torchvision() is False


# A stand-in torchvision whose import fails as a CUDA build's does next to a CPU torch, unless the schema exists.
FAKE_TORCHVISION = """
import torch
from torchvision import helpers  # a submodule imported before the failure must be imported afresh after it
try:
    torch.ops.torchvision.nms.default
except (AttributeError, RuntimeError):
    raise RuntimeError({message!r})
READY = helpers.VALUE
"""


def _fake_torchvision(root: Path, message: str) -> Path:
    package = root / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_TORCHVISION.format(message=message))
    (package / "helpers.py").write_text("VALUE = 42\n")
    return root


def _import_fake(root: Path, hooked: bool) -> subprocess.CompletedProcess:
    return _python(
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        + ("import vitpool._torchvision_compat as c; c.install_import_hook()\n" if hooked else "")
        + "import torch, torchvision\n"
        "print(torchvision.READY, torch.ops.torchvision.nms.default._schema.name, torchvision.__file__)\n",
        env=None if hooked else NO_HOOK,
    )


def test_import_hook_repairs_the_first_import_of_torchvision(tmp_path):
    root = _fake_torchvision(tmp_path, "operator torchvision::nms does not exist")
    plain = _import_fake(root, hooked=False)
    assert plain.returncode != 0 and "operator torchvision::nms does not exist" in plain.stderr
    hooked = _import_fake(root, hooked=True)
    assert hooked.returncode == 0, hooked.stderr
    ready, schema, where = hooked.stdout.split()
    assert (ready, schema) == ("42", "torchvision::nms") and where.startswith(str(root))


def test_import_hook_leaves_other_errors_alone(tmp_path):
    root = _fake_torchvision(tmp_path, "CUDA driver version is insufficient")
    hooked = _import_fake(root, hooked=True)
    assert hooked.returncode != 0 and "CUDA driver version is insufficient" in hooked.stderr


def test_hook_file_is_written_only_where_the_plain_import_fails(tmp_path):
    plain = _python("import torchvision")
    assert write_hook_if_needed(str(tmp_path)) == (plain.returncode != 0)
    assert (tmp_path / HOOK_FILE).is_file() == (plain.returncode != 0)


def test_readme_python_example_runs_as_written(deit_tiny_weights, tmp_path):
    """Verbatim, from a project folder next to the shared data, in this environment with its start-up hook."""
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "shared").symlink_to(deit_tiny_weights.parents[2])
    run = _python(code, env=None, cwd=project)
    assert run.returncode == 0, run.stderr
    shape, description = run.stdout.splitlines()
    assert shape == "torch.Size([2, 1000])"
    assert description.startswith("kmedoids, 0 iterations, 8 seeds for spread, mean outputs") and "after-attention" in description
    assert (project / "runs" / "deit_tiny_example" / "vitpool.json").is_file()
