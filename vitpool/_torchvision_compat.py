"""Make torchvision importable when its compiled ops do not match the installed torch.

PyPI's Linux torchvision wheels are CUDA builds. Next to a CPU-only torch their C++ extension fails to
register its operators, and ``import torchvision`` (so ``import timm``) dies with
"operator torchvision::nms does not exist". vitpool needs none of those detection ops, so when, and only
when, that import fails, we declare the two missing schemas and import again.
"""

from __future__ import annotations

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
    global _library
    try:
        import torchvision  # noqa: F401

        return False
    except RuntimeError as error:
        if not is_missing_op_error(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OP_SCHEMAS.values():
        _library.define(schema)
    import torchvision  # noqa: F401

    return True
