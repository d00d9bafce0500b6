"""`vitpool finetune`: a loadable model, log and checkpoint; resume after kill -9 equals an uninterrupted run;
distillation without labels; two processes under torchrun keep identical weights; timm's gradient scaler trains as
plain steps do, also past unreadable batches; bad input refused.

Mechanics only: a random DeiT-Tiny at 64x64 pixels (16 patches, pooled to 8 then 4) on seeded noise images,
so an epoch takes about a second. The accuracy figures are in benchmarks/finetune_deit_tiny.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_user_error, noise_folder, run_in_process

BIN = Path(sys.executable).parent
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
       "TERM": "dumb", "OMP_NUM_THREADS": "1"}
TRAIN = ["--epochs", "3", "-b", "4", "--lr", "1e-4", "--warmup-epochs", "1", "--workers", "1", "--seed", "7"]


def vitpool(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vitpool"), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def epochs_without_timing(log: Path) -> list[dict]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in records]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A saved converted random DeiT-Tiny for 64x64 images, and labelled noise images (4 classes x 12)."""
    import torch

    import vitpool
    from vitpool.models import create_model

    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    base = create_model("deit_tiny", pretrained=False, img_size=64)
    model_dir = vitpool.save(vitpool.convert(base, k=[8, 4], layers=[3, 7]), root / "converted")
    (root / "images").mkdir()
    images = noise_folder(root / "images", ("n01440764", "n01443537", "n01484850", "n01491361"), 12, (72, 80), seed=3)
    return model_dir, images, root


def test_finetune_writes_a_model_every_command_loads(small, tmp_path):
    import torch

    from vitpool import models

    model_dir, images, _ = small
    out = tmp_path / "tuned"
    done = vitpool("finetune", model_dir, "--data", images, "--val", images, "--out", out, "--json", *TRAIN)
    assert done.returncode == 0, done.stderr
    history = json.loads(done.stdout)["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert all(r["val"]["n"] == 48 for r in history)
    assert all(r["images"] == 48 for r in history[1:])  # 48 images, batches of 4: every image once per epoch
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert history[1]["lr"] > history[3]["lr"]  # cosine decay after the warm-up epoch

    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and {"model", "optimizer", "scheduler", "history"} <= state.keys()
    tuned, original = models.load(out), models.load(model_dir)
    assert tuned.vitpool_config == original.vitpool_config
    assert same_tensors(tensors(out / "model.safetensors"), {k: v.contiguous() for k, v in state["model"].items()})
    assert not same_tensors(tensors(out / "model.safetensors"), tensors(model_dir / "model.safetensors"))

    evaluated = vitpool("eval", out, "--data", images, "--json", "--workers", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["n"] == 48 and result["top1"] == pytest.approx(history[-1]["val"]["top1"])


def test_resume_after_kill_equals_an_uninterrupted_run(small, tmp_path):
    model_dir, images, _ = small
    args = ["finetune", model_dir, "--data", images, "--out"]
    extra = [*TRAIN, "--mixup", "0.8", "--cutmix", "1.0", "--model-ema", "--model-ema-decay", "0.9"]
    whole = vitpool(*args, tmp_path / "whole", *extra)
    assert whole.returncode == 0, whole.stderr

    cut = tmp_path / "cut"
    process = subprocess.Popen([str(BIN / "vitpool"), *map(str, args), str(cut), *extra], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = cut / "log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and '"epoch": 1' in log.read_text():
            time.sleep(0.3)  # into epoch 2
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    import torch

    interrupted_at = torch.load(cut / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]
    assert interrupted_at < 3

    resumed = vitpool(*args, cut, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert same_tensors(tensors(cut / "model.safetensors"), tensors(tmp_path / "whole" / "model.safetensors"))
    assert epochs_without_timing(cut / "log.jsonl") == epochs_without_timing(tmp_path / "whole" / "log.jsonl")


def test_distill_only_learns_from_the_teacher_on_unlabelled_images(small, tmp_path):
    import torch

    from vitpool import models
    from vitpool.finetune import TrainSettings, finetune

    model_dir, images, _ = small
    flat = tmp_path / "unlabelled"
    flat.mkdir()
    for i, path in enumerate(sorted(images.rglob("*.png"))[:16]):
        shutil.copy(path, flat / f"{i}.png")
    loaded = models.read_saved(model_dir)
    student = models.load(model_dir)
    settings = TrainSettings(epochs=2, batch_size=4, lr=1e-4, distill_only=True, seed=1)
    result = finetune(student, loaded.model, flat, tmp_path / "out", settings, {"model": str(model_dir)}, workers=0)
    for record in result.history:
        assert record["train_loss"] == pytest.approx(record["kd_loss"])  # the label loss has weight 0
    with torch.inference_mode():
        assert torch.isfinite(result.model(torch.randn(2, 3, 64, 64))).all()


TORCHRUN_SCRIPT = """
import os, sys
from safetensors.torch import save_file
from vitpool import models
from vitpool.finetune import TrainSettings, finetune
model_dir, images, out, mine = sys.argv[1:5]
loaded = models.read_saved(model_dir)
result = finetune(models.load(model_dir), loaded.model, images, out, TrainSettings(epochs=2, batch_size=4, lr=1e-4, seed=3),
                  {"model": model_dir}, val_dir=images, workers=0)
rank = int(os.environ["RANK"])
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, f"{mine}{rank}.safetensors")
"""


def test_torchrun_two_processes_train_identical_weights(small, tmp_path):
    model_dir, images, _ = small
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "out"
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(model_dir), str(images),
               str(out), str(tmp_path / "rank")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks, so nothing outlives the test
        output, _ = process.communicate()
        ranks = sorted(p.name for p in tmp_path.glob("rank*"))
        pytest.fail(f"torchrun did not finish in 180 s (rank files written: {ranks}):\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    rank0, rank1 = tensors(tmp_path / "rank0.safetensors"), tensors(tmp_path / "rank1.safetensors")
    assert same_tensors(rank0, rank1)
    assert not same_tensors(rank0, tensors(model_dir / "model.safetensors"))
    assert same_tensors(rank0, tensors(out / "model.safetensors"))  # rank 0 wrote the output
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert all(r["images"] == 48 for r in history[1:])  # each process took half of the 48 images
    assert all(r["val"]["n"] == 48 for r in history)  # validation shares summed over both processes


def refusals(model_dir: Path, images: Path, root: Path) -> dict[str, tuple[list, list[str]]]:
    done_run = root / "done"
    return {
        "existing_out": (["--out", images], ["already exists", "--resume", "--force"]),
        "resume_nothing": (["--out", root / "nothing", "--resume"], ["no run to resume"]),
        "resume_other_settings": (["--out", done_run, "--resume", "--lr", "0.001"], ["other settings", "lr: 0.0001 -> 0.001"]),
        "resume_and_force": (["--out", root / "x", "--resume", "--force"], ["give one of them"]),
        "distill_only_without_teacher": (["--out", root / "x", "--distill-only", "--no-distill"], ["--distill-only", "--no-distill"]),
        "fp16_on_cpu": (["--out", root / "x", "--device", "cpu", "--amp", "--amp-dtype", "float16"], ["float16 needs a CUDA GPU"]),
        "cuda_missing": (["--out", root / "x", "--device", "cuda"], ["no CUDA GPU"]),
        "batch_too_large": (["--out", root / "x", "-b", "1000"], ["fewer than one batch", "--batch-size"]),
        "bad_scale": (["--out", root / "x", "--scale", "0.5"], ["--scale"]),
        "bad_epochs": (["--out", root / "x", "--epochs", "0"], ["--epochs must be positive"]),
        "infinite_lr": (["--out", root / "x", "--lr", "inf"], ["--lr must be a finite number > 0; got inf"]),
        "nan_warmup_lr": (["--out", root / "x", "--warmup-lr", "nan"], ["--warmup-lr must be a finite number >= 0; got nan"]),
        "parent_is_file": (["--out", root / "afile" / "out"], ["cannot write", "afile"]),
    }


def test_bad_input_is_one_line_and_writes_nothing(small, tmp_path):
    import torch

    model_dir, images, _ = small
    done_run = tmp_path / "done"
    first = vitpool("finetune", model_dir, "--data", images, "--out", done_run, *TRAIN)
    assert first.returncode == 0, first.stderr
    (tmp_path / "afile").write_text("not a folder\n")
    cases = refusals(model_dir, images, tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    cuda = torch.cuda.is_available()
    runs = {name: ["finetune", model_dir, "--data", images, *TRAIN, *args]
            for name, (args, _) in cases.items() if not (name == "cuda_missing" and cuda)}
    runs["unconverted"] = ["finetune", "deit_tiny", "--no-pretrained", "--data", images, "--out", tmp_path / "x", *TRAIN]
    for name, args in runs.items():  # in process: a refusal needs no fresh interpreter, and exits as the command does
        assert_user_error(run_in_process(args), cases[name][1] if name in cases else ["trains a converted model", "--k"])
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


FLOAT_SETTINGS = {  # field: (flag, a value outside its range besides NaN and infinity)
    "lr": ("--lr", 0.0), "warmup_lr": ("--warmup-lr", -1e-6), "min_lr": ("--min-lr", -1e-6),
    "weight_decay": ("--weight-decay", -0.1), "clip_grad": ("--clip-grad", 0.0),
    "distill_loss_weight": ("--distill-loss-weight", -1.0), "task_loss_weight": ("--task-loss-weight", -1.0),
    "kd_temperature": ("--kd-temperature", 0.0), "smoothing": ("--smoothing", 1.0), "mixup": ("--mixup", -0.5),
    "cutmix": ("--cutmix", -0.5), "model_ema_decay": ("--model-ema-decay", 1.0), "reprob": ("--reprob", 1.5),
    "hflip": ("--hflip", -0.1), "color_jitter": ("--color-jitter", -0.4),
}


def test_every_float_setting_must_be_a_finite_number_in_its_range():
    from dataclasses import fields

    from vitpool.errors import VitpoolError
    from vitpool.finetune import TrainSettings

    floats = {f.name for f in fields(TrainSettings) if "float" in str(f.type) and f.name != "scale"}
    assert floats == FLOAT_SETTINGS.keys()  # a new float setting needs its check (and a case here)
    TrainSettings(clip_grad=1.0).check()
    for name, (flag, outside) in FLOAT_SETTINGS.items():
        for value in (float("nan"), float("inf"), float("-inf"), outside):
            with pytest.raises(VitpoolError) as error:
                TrainSettings(**{name: value}).check()
            message = str(error.value)
            assert message.startswith(f"{flag} must be ") and message.endswith(f"; got {value}") and "\n" not in message
    for scale in ((float("nan"), 1.0), (0.08, float("inf"))):
        with pytest.raises(VitpoolError, match="--scale"):
            TrainSettings(scale=scale).check()


def test_a_diverging_first_update_stops_the_run_keeping_the_start(small, tmp_path):
    """A learning rate past float32 makes AdamW's first update overflow (the loss before it is finite; torch
    raises or writes infinities): the run stops in one line and OUT keeps the model it started from, loadable,
    and no checkpoint."""
    import torch

    from vitpool import load

    model_dir, images, _ = small
    out = tmp_path / "out"
    done = run_in_process(["finetune", model_dir, "--data", images, "--out", out, *TRAIN, "--lr", "1e39", "--warmup-epochs", "0"])
    assert_user_error(done, ["at epoch 1, step 1", "keeps the model it started from", "lower --lr"])
    assert not (out / "checkpoint.pt").exists()
    assert same_tensors(tensors(out / "model.safetensors"), tensors(model_dir / "model.safetensors"))
    with torch.inference_mode():
        assert torch.isfinite(load(out)(torch.randn(2, 3, 64, 64))).all()


DIVERGING_SCRIPT = """
import sys
import timm.optim
import torch
real = timm.optim.create_optimizer_v2
def create(*args, **kwargs):  # an optimizer whose 15th update (epoch 2, step 3 of 12) leaves a NaN weight
    optimizer = real(*args, **kwargs)
    updates = [0]
    def poison(optimizer, args, kwargs):
        updates[0] += 1
        if updates[0] == 15:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
    optimizer.register_step_post_hook(poison)
    return optimizer
timm.optim.create_optimizer_v2 = create
from vitpool.cli import main
sys.argv = ["vitpool", *sys.argv[1:]]
main()
"""


def test_weights_gone_non_finite_stop_the_run_keeping_the_last_finished_epoch(small, tmp_path):
    import torch

    from vitpool import load

    model_dir, images, _ = small
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGING_SCRIPT)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), "finetune", model_dir, "--data", images, "--out", out, *TRAIN],
                          capture_output=True, text=True, env=ENV, timeout=900)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and done.stdout == "" and len(errors) == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in done.stderr, done.stderr
    expect = ("NaN or infinite in the update at epoch 2, step 3", "keeps epoch 1's model", "lower --lr")
    assert all(f in errors[0] for f in expect), errors[0]
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert same_tensors(tensors(out / "model.safetensors"), {k: v.contiguous() for k, v in state["model"].items()})
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    with torch.inference_mode():
        assert torch.isfinite(load(out)(torch.randn(2, 3, 64, 64))).all()


class Stop(Exception):
    pass


def test_the_number_of_loader_workers_does_not_change_the_weights(small, tmp_path):
    """Each image's augmentation is drawn from (seed, epoch, index): a run with -j 0 equals one that trained its
    first epoch with two workers and was resumed with one."""
    import torch

    from vitpool import models
    from vitpool.finetune import TrainSettings, finetune

    model_dir, images, _ = small
    settings = TrainSettings(epochs=2, batch_size=4, lr=1e-4, mixup=0.8, cutmix=1.0, reprob=0.5, seed=5)
    source = {"model": str(model_dir)}

    def train(out, workers, resume=False, on_epoch=None):
        return finetune(models.load(model_dir), models.read_saved(model_dir).model, images, out, settings, source,
                        resume=resume, workers=workers, on_epoch=on_epoch)

    def stop_after_first(record):
        if record["epoch"] == 1:  # epoch 1's checkpoint and model are written: as if killed there
            raise Stop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for the commands: the loader workers share few cores
    try:
        train(tmp_path / "whole", workers=0)
        with pytest.raises(Stop):
            train(tmp_path / "cut", workers=2, on_epoch=stop_after_first)
        assert torch.load(tmp_path / "cut" / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] == 1
        train(tmp_path / "cut", workers=1, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert same_tensors(tensors(tmp_path / "cut" / "model.safetensors"), tensors(tmp_path / "whole" / "model.safetensors"))
    assert epochs_without_timing(tmp_path / "cut" / "log.jsonl") == epochs_without_timing(tmp_path / "whole" / "log.jsonl")


def test_nproc_per_node_trains_in_processes_and_fails_in_one_line(small, tmp_path):
    """`--nproc-per-node` launches the processes itself (torch's elastic launcher, as torchrun --standalone):
    a bad flag is the processes' one line and exit code, without torchrun's ChildFailedError report."""
    model_dir, images, _ = small
    bad = vitpool("finetune", model_dir, "--data", images, "--out", tmp_path / "bad", *TRAIN, "--lr", "inf",
                  "--nproc-per-node", "2")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and lines == ["error: --lr must be a finite number > 0; got inf"], bad.stderr
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "out"
    done = vitpool("finetune", model_dir, "--data", images, "--out", out, *TRAIN, "--epochs", "1", "--nproc-per-node=2",
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "finetune.json").read_text())["world_size"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_without_option_keeps_every_other_argument():
    from vitpool.cli import without_option

    argv = ["finetune", "m", "--nproc-per-node", "2", "--lr", "1", "--nproc-per-node=4", "--out", "x"]
    assert without_option(argv, "--nproc-per-node") == ["finetune", "m", "--lr", "1", "--out", "x"]


def test_the_gradient_scaler_trains_as_plain_steps_do_also_when_an_update_ends_unreadable(small, tmp_path, monkeypatch):
    """timm's NativeScaler (float16 on CUDA; here float32 on the CPU, where scaling by a power of two is exact) gives
    the weights of plain steps, also for updates whose last batch, or every batch, could not be read."""
    import torch
    from timm.utils import NativeScaler

    import vitpool
    from vitpool.finetune import TrainSettings, Training, finetune

    model_dir, images, _ = small
    data_dir = tmp_path / "images"
    shutil.copytree(images, data_dir)
    for folder in data_dir.iterdir():
        for index in range(4):
            (folder / f"broken{index}.jpg").write_bytes(b"not an image")
    settings = TrainSettings(epochs=1, batch_size=1, grad_accum_steps=2, lr=1e-3, warmup_epochs=0, distill=False)
    build, backward = Training.build.__func__, Training._backward
    ended_unreadable = []  # per update ended by an unreadable batch: whether earlier batches left gradients

    def watched(self, loss, epoch, step, update):
        if loss is None:
            ended_unreadable.append(any(parameter.grad is not None for parameter in self.student.parameters()))
        return backward(self, loss, epoch, step, update)

    def trained(scaled: bool) -> dict:
        def build_with_scaler(cls, *args, **kwargs):
            training = build(cls, *args, **kwargs)
            training.scaler = NativeScaler("cpu") if scaled else None
            return training

        monkeypatch.setattr(Training, "build", classmethod(build_with_scaler))
        monkeypatch.setattr(Training, "_backward", watched)
        result = finetune(vitpool.load(model_dir), None, data_dir, tmp_path / f"out_{scaled}", settings, source={},
                          device="cpu", workers=0)
        return result.model.state_dict()

    start, plain, scaled = vitpool.load(model_dir).state_dict(), trained(False), trained(True)
    assert True in ended_unreadable and False in ended_unreadable  # both kinds of update happened
    assert any(not torch.equal(plain[name], start[name]) for name in start)
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name], rtol=0, atol=1e-6)
