"""Make torchvision importable when its compiled ops do not match the installed torch.

PyPI's Linux torchvision wheels are CUDA builds. Next to a CPU-only torch their C++ extension fails to
register its operators, and ``import torchvision`` (so ``import timm``) dies with
"operator torchvision::nms does not exist". vitpool needs none of those detection ops, so when, and only
when, that import fails, we declare the two missing schemas and import again.

vitpool's own imports go through `ensure_torchvision`. For code that imports timm before vitpool (`import timm,
vitpool`), `make install` runs this module, which, only where the plain import fails, writes a `.pth` file
into the environment so that every interpreter there starts with `install_import_hook()`: the same repair, run
by the import system the first time anything imports torchvision. Without torch or torchvision imported
up front, so interpreter start-up stays instant; `VITPOOL_NO_TORCHVISION_HOOK=1` turns the hook off.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_MISSING_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_library = None  # keeps the schema registration alive for the process


def is_missing_op_error(error: BaseException) -> bool:
    """True for the error a torchvision build mismatched with torch raises at import."""
    return isinstance(error, RuntimeError) and "operator torchvision::" in str(error) and "does not exist" in str(error)


def ensure_torchvision() -> bool:
    """Import torchvision, repairing the missing-operator failure. Returns True when the repair was needed."""
    try:
        import torchvision  # noqa: F401

        return False
    except RuntimeError as error:
        if not is_missing_op_error(error):
            raise
    _forget_torchvision()
    _define_missing_ops()
    import torchvision  # noqa: F401

    return True


def _forget_torchvision(keep: object = None) -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        if sys.modules[name] is not keep:
            del sys.modules[name]


def _define_missing_ops() -> None:
    global _library
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OP_SCHEMAS.values():
        _library.define(schema)


class _RepairingLoader:
    """torchvision's own loader, run again after the repair when its first run fails with the missing operator."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self.loader.exec_module(module)
        except RuntimeError as error:
            if not is_missing_op_error(error):
                raise
            _forget_torchvision(keep=module)
            _define_missing_ops()
            self.loader.exec_module(module)


class _TorchvisionFinder:
    """Finds torchvision as the rest of `sys.meta_path` would, with `_RepairingLoader` around its loader; once."""

    def find_spec(self, name: str, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RepairingLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    """Repair torchvision's import whenever it is first imported (the `.pth` file's line; cheap: no imports)."""
    if os.environ.get("VITPOOL_NO_TORCHVISION_HOOK") or "torchvision" in sys.modules:
        return
    if not any(isinstance(finder, _TorchvisionFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


HOOK_FILE = "vitpool_torchvision_repair.pth"


def write_hook_if_needed(site_packages: str) -> bool:
    """Write the `.pth` file into `site_packages` when a plain `import torchvision` fails with the missing
    operator in this interpreter's environment, remove a stale one otherwise; True when written."""
    import subprocess
    from pathlib import Path

    target = Path(site_packages) / HOOK_FILE
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True,
                           env={**os.environ, "VITPOOL_NO_TORCHVISION_HOOK": "1"})
    if plain.returncode == 0 or "operator torchvision::" not in plain.stderr:
        target.unlink(missing_ok=True)
        return False
    target.write_text("import vitpool._torchvision_compat; vitpool._torchvision_compat.install_import_hook()\n")
    return True


def main() -> None:
    """`make install`'s step: the hook for this interpreter's environment, where it needs one."""
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    written = write_hook_if_needed(purelib)
    print(f"torchvision import repair: {'installed' if written else 'not needed'} ({os.path.join(purelib, HOOK_FILE)})")
