"""The example scripts run against the real data and print what they claim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_convert_and_evaluate_example(deit_tiny_weights, imagenet_sample):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "convert_and_evaluate.py"), "--checkpoint", str(deit_tiny_weights),
         "--data", str(imagenet_sample), "--limit", "20"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    ratio = float(re.search(r"ratio (\d\.\d+)", run.stdout).group(1))
    assert abs(ratio - 0.6) <= 0.006
    assert "on 20 images" in run.stdout and "saved and reloaded: kmedoids" in run.stdout
