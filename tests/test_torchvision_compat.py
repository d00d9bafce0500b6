"""The torchvision repair acts only when torchvision's own import fails, and then makes it importable."""

from __future__ import annotations

import subprocess
import sys

from vitpool._torchvision_compat import ensure_torchvision, is_missing_op_error


def test_only_the_missing_operator_error_is_recognised():
    assert is_missing_op_error(RuntimeError("operator torchvision::nms does not exist"))
    assert not is_missing_op_error(RuntimeError("CUDA out of memory"))
    assert not is_missing_op_error(ImportError("operator torchvision::nms does not exist"))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


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
