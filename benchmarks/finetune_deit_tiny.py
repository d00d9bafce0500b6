"""Issue 5's figure: the real DeiT-Tiny pooled with weighted K-Medoids at 0.6 of its MACs, fine-tuned by
distillation from the unpooled model on 300 of the 500 shared photos for a few minutes on this CPU, and
validated before and after every epoch on the 200 others (agreement with the unpooled model, top-1).
Runs the `vitpool finetune` command as a user would; the photos are linked, not copied, into a temporary
train/val split. Writes benchmarks/results/finetune_deit_tiny.json (and the model under runs/).

    .venv/bin/python benchmarks/finetune_deit_tiny.py [--epochs 8] [-- extra finetune options]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, SHARED_DATA, deit_tiny_weights, imagenet_sample, run_environment, write_json

WEIGHTS = deit_tiny_weights()
PHOTOS = imagenet_sample()
VALIDATION = 200


def linked_split(root: Path) -> tuple[Path, Path]:
    """root/train and root/val as class folders of symbolic links: the validation photos spread over the classes."""
    photos = sorted(p for p in PHOTOS.glob("*/*") if p.is_file())
    held_out = {(i * len(photos)) // VALIDATION for i in range(VALIDATION)}
    for i, photo in enumerate(photos):
        folder = root / ("val" if i in held_out else "train") / photo.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / photo.name).symlink_to(photo)
    return root / "train", root / "val"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--out", type=Path, default=Path("runs/deit_tiny_finetuned"))
    parser.add_argument("--result", type=Path, default=RESULTS / "finetune_deit_tiny.json")
    parser.add_argument("extra", nargs="*", help="further `vitpool finetune` options, after --")
    args = parser.parse_args()
    if not WEIGHTS.is_file() or not PHOTOS.is_dir():
        sys.exit(f"needs the shared data in {SHARED_DATA} (see its README)")
    vitpool = Path(sys.executable).parent / "vitpool"
    with tempfile.TemporaryDirectory() as folder:
        train, val = linked_split(Path(folder))
        # the settings of the recorded run (the defaults before the vitpool preset): the paper's, proportional attention
        command = [str(vitpool), "finetune", "deit_tiny", "--checkpoint", str(WEIGHTS), "--preset", "paper", "--proportional",
                   "--budget", str(args.budget), "--data", str(train), "--val", str(val), "--out", str(args.out),
                   "--epochs", str(args.epochs), "--force", "--json", *args.extra]
        started = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(done.returncode)
    report = json.loads(done.stdout)
    history = report["history"]
    before, after = history[0]["val"], history[-1]["val"]
    training = sum(r.get("seconds", 0.0) for r in history)
    write_json(args.result, {
        "what": "DeiT-Tiny (shared real weights), weighted K-Medoids at a MAC budget, fine-tuned by distillation "
                "from the unpooled model on 300 shared photos, validated on the 200 others",
        "command": " ".join(["vitpool", *command[1:]]).replace(str(Path(folder)), "SPLIT"),
        "pooling": report["pooling"],
        "train_images": 300,
        "val_images": before["n"],
        "unpooled_top1": before["teacher_top1"],
        "before": before,
        "after": after,
        "top1_rise": after["top1"] - before["top1"],
        "agreement_rise": after["agreement"] - before["agreement"],
        "training_seconds": training,
        "wall_seconds": seconds,
        "history": history,
        "env": run_environment(),
    })
    print(f"agreement {before['agreement']:.1f} -> {after['agreement']:.1f}%, top-1 {before['top1']:.1f} -> "
          f"{after['top1']:.1f}% (unpooled {before['teacher_top1']:.1f}%), {training / 60:.1f} min of training, "
          f"{seconds / 60:.1f} min in all")


if __name__ == "__main__":
    main()
