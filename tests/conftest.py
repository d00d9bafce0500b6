from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEIT_TINY_WEIGHTS = SHARED_DATA / "weights" / "deit_tiny_patch16_224.pth"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample"


@pytest.fixture(scope="session")
def deit_tiny_weights() -> Path:
    if not DEIT_TINY_WEIGHTS.is_file():
        pytest.skip(f"real DeiT-Tiny weights not found at {DEIT_TINY_WEIGHTS} (see ../shared/data/README.md)")
    return DEIT_TINY_WEIGHTS


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"real ImageNet sample not found at {IMAGENET_SAMPLE} (see ../shared/data/README.md)")
    return IMAGENET_SAMPLE


@pytest.fixture(scope="session")
def real_deit_tiny(deit_tiny_weights):
    from vitpool.models import create_model

    return create_model("deit_tiny", checkpoint=deit_tiny_weights)


@pytest.fixture(scope="session")
def tiny_model():
    """DeiT-Tiny with seeded random weights, for tests about mechanics rather than accuracy (never modified)."""
    import torch

    from vitpool.models import create_model

    torch.manual_seed(0)
    return create_model("deit_tiny", pretrained=False).eval()


def noise_folder(root: Path, classes: tuple[str, ...], per_class: int, size: tuple[int, int], seed: int) -> Path:
    """An image folder root/<class>/<i>.png of seeded noise photos, `size` = (height, width)."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for name in classes:
        (root / name).mkdir()
        for i in range(per_class):
            pixels = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


class _RunsCommand:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def pickle_that_runs_code(path: Path, marker: Path) -> Path:
    """A .pth at `path` whose unpickling would create `marker` (an unsafe torch.load does run it)."""
    import torch

    torch.save({"weight": torch.zeros(2), "payload": _RunsCommand(f"touch {marker}")}, path)
    return path


# The command line in this process, as a fresh interpreter would show it: a refusal needs no new interpreter (~3 s
# of imports each); what depends on the process (the hub's environment, stdout as a file descriptor) runs the
# console script in a subprocess instead.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Result:
    args: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def lines(self) -> list[str]:
        return [line for line in ANSI.sub("", self.stderr).splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"vitpool {' '.join(self.args)}\nrc={self.rc} ({self.seconds:.1f}s)\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


# The warnings a fresh interpreter hides (pytest shows more)
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


class LastResort(logging.StreamHandler):
    """What `logging.lastResort` prints in a fresh interpreter, which pytest's own handlers on the root logger
    silence: a record of WARNING or above that no handler below the root took (vitpool's own warnings, which its
    handler prints, would otherwise show twice)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.setLevel(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        while logger is not logging.root:
            if logger.handlers:
                return
            logger = logger.parent
        super().emit(record)


def run_in_process(args) -> Result:
    """`vitpool.cli.main` with `args` in this process: its exit code, stdout and stderr, with the warnings and log
    records (of WARNING and above) that a fresh interpreter would print on stderr, and any exception's traceback."""
    from vitpool.cli import main

    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    records = LastResort(err)
    start = time.monotonic()
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught,
          mock.patch.object(sys, "argv", ["vitpool", *args]), mock.patch.dict(os.environ, HF_HUB_OFFLINE="1")):
        warnings.simplefilter("default")
        for category in HIDDEN_WARNINGS:
            warnings.simplefilter("ignore", category)
        logging.root.addHandler(records)
        try:
            main()
            rc = 0
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except Exception:
            traceback.print_exc(file=err)
            rc = 1
        finally:
            logging.root.removeHandler(records)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return Result(args, rc, out.getvalue(), err.getvalue() + shown, time.monotonic() - start)


def assert_user_error(result: Result, expect=()) -> str:
    """Exit code 2, exactly one non-empty stderr line starting with "error:", nothing on stdout, no traceback."""
    assert not result.timed_out, f"timed out\n{result}"
    assert result.rc == 2, str(result)
    assert "Traceback" not in result.stderr + result.stdout, str(result)
    assert result.stdout == "", str(result)
    lines = result.lines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}\n{result}"
    assert lines[0].startswith("error:"), str(result)
    for fragment in expect:
        assert fragment in lines[0], f"{fragment!r} not in the error\n{result}"
    return lines[0]
