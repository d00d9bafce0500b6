"""Fine-tuning a converted model with timm's training pieces, distilled from its unpooled original.

The loss is timm's task (`LogitDistillationTask`, or `ClassificationTask` without a teacher); transforms,
mixup, optimizer, scheduler and EMA are timm's factories. One process, or many under torchrun
(DistributedDataParallel; NCCL on GPUs, gloo on CPU), where only rank 0 writes and reports.

The output folder is always a converted model every command loads (the latest epoch's weights), next to
`checkpoint.pt` (all `--resume` needs), `finetune.json` (the run's settings) and `log.jsonl` (one line per
epoch). Every epoch takes its randomness (shuffle, mixup, loader workers) from (seed, epoch, rank) and each
image's augmentation from (seed, epoch, index) alone, instead of carrying generator states across epochs: so
a run resumed after epoch e trains epoch e+1 exactly as an uninterrupted run does, for any number of
processes, and the number of loader workers (`-j`) does not change the weights.

Settings are checked before any work (every float finite and in its range), and the weights after every
update: a run whose weights become NaN or infinite stops with one line, its output holding the last finished
epoch's model.
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vitpool import data, models
from vitpool.errors import VitpoolError
from vitpool.outputs import writable_parent, write_atomically

SETTINGS_FILE = "finetune.json"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
AMP_DTYPES = ("bfloat16", "float16")
CLIP_MODES = ("norm", "value", "agc")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; names follow timm's train.py where it has one."""

    epochs: int = 5
    batch_size: int = 32  # per process
    lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    grad_accum_steps: int = 1
    clip_grad: float | None = None
    clip_mode: str = "norm"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    seed: int = 42
    distill: bool = True
    distill_only: bool = False
    distill_loss_weight: float = 1.0
    task_loss_weight: float = 1.0
    kd_temperature: float = 1.0
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    aa: str | None = None
    reprob: float = 0.0
    hflip: float = 0.5
    color_jitter: float = 0.4
    scale: tuple[float, float] = (0.08, 1.0)

    def check(self) -> None:
        """One clear line for each kind of impossible setting; every float must be a finite number in its range."""
        positive = {"--epochs": self.epochs, "--batch-size": self.batch_size, "--grad-accum-steps": self.grad_accum_steps}
        for flag, value in positive.items():
            if not value > 0:
                raise VitpoolError(f"{flag} must be positive; got {value}")
        # (flag, value, lowest, lowest allowed?, highest or None, highest allowed?)
        numbers = [
            ("--lr", self.lr, 0, False, None, False),
            ("--warmup-lr", self.warmup_lr, 0, True, None, False),
            ("--min-lr", self.min_lr, 0, True, None, False),
            ("--weight-decay", self.weight_decay, 0, True, None, False),
            ("--clip-grad", self.clip_grad, 0, False, None, False),
            ("--distill-loss-weight", self.distill_loss_weight, 0, True, None, False),
            ("--task-loss-weight", self.task_loss_weight, 0, True, None, False),
            ("--kd-temperature", self.kd_temperature, 0, False, None, False),
            ("--smoothing", self.smoothing, 0, True, 1, False),
            ("--mixup", self.mixup, 0, True, None, False),  # Beta-distribution alphas; 0: off
            ("--cutmix", self.cutmix, 0, True, None, False),
            ("--model-ema-decay", self.model_ema_decay, 0, False, 1, False),
            ("--reprob", self.reprob, 0, True, 1, True),
            ("--hflip", self.hflip, 0, True, 1, True),
            ("--color-jitter", self.color_jitter, 0, True, None, False),
        ]
        for flag, value, low, low_ok, high, high_ok in numbers:
            if value is None:  # --clip-grad not given
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value >= low if low_ok else value > low)
                    and (high is None or (value <= high if high_ok else value < high))):
                if high is None:
                    allowed = f"a finite number {'>=' if low_ok else '>'} {low}"
                else:
                    allowed = f"a number in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
                raise VitpoolError(f"{flag} must be {allowed}; got {value}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise VitpoolError(f"--warmup-epochs must be between 0 and --epochs ({self.epochs}); got {self.warmup_epochs}")
        if self.distill_only and not self.distill:
            raise VitpoolError("--distill-only trains on the teacher's outputs alone; it cannot go with --no-distill")
        if self.amp_dtype not in AMP_DTYPES:
            raise VitpoolError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}; got {self.amp_dtype!r}")
        if self.clip_mode not in CLIP_MODES:
            raise VitpoolError(f"--clip-mode must be one of {', '.join(CLIP_MODES)}; got {self.clip_mode!r}")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise VitpoolError(f"--mixup/--cutmix mix pairs of images: --batch-size must be even; got {self.batch_size}")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise VitpoolError(f"--scale takes two crop-area fractions 0 < MIN <= MAX <= 1, e.g. 0.08,1; got {low},{high}")

    def to_dict(self) -> dict:
        return {**asdict(self), "scale": list(self.scale)}


@dataclass
class Process:
    """Where this process trains: its rank among `world_size` and its device."""

    rank: int
    world_size: int
    device: object  # torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_process(device: str | None) -> Process:
    """The device (cuda when present unless told), and the process group when torchrun started several processes."""
    import torch
    import torch.distributed as dist

    if device not in (None, "cpu", "cuda"):
        raise VitpoolError(f"--device must be cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise VitpoolError("--device cuda was asked for but PyTorch sees no CUDA GPU here; use --device cpu")
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    return Process(rank, world_size, torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu"))


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed Python, NumPy and torch for one epoch of one process; returns the seed for the loader's generator."""
    import numpy
    import torch

    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    random.seed(value)
    numpy.random.seed(value)
    torch.manual_seed(value)
    return value


def launch_processes(nproc: int, argv: list[str]) -> int:
    """Run `vitpool ARGV` in `nproc` processes on this machine, as `torchrun --standalone` would (torch's own
    elastic launcher), and return their exit code: each process prints its own one-line error (rank 0 only),
    so torchrun's failure report, which would follow it, is left out."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # as torchrun sets it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the report, and its warnings
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"vitpool-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "vitpool.cli", *argv)
    except ChildFailedError as error:
        codes = [failure.exitcode for _, failure in sorted(error.failures.items())]
        return next((code for code in codes if code > 0), 1)  # the others were stopped by a signal (negative codes)
    return 0


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training image's augmentation in one epoch: (seed, epoch, index) alone, well mixed."""
    import numpy

    return int(numpy.random.SeedSequence((seed % 2**64, epoch, index)).generate_state(1)[0])


class SeededItems:
    """The training dataset with each image's augmentation drawn from (seed, epoch, its index) alone: which loader
    worker decodes it, or the main process with `-j 0`, does not matter, so the number of workers does not change
    the weights. Python's, NumPy's and torch's CPU generators are seeded for the item and then restored, so that
    with `-j 0` the main process's randomness (mixup, dropout) is what it is with workers."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import numpy
        import torch

        value = item_seed(self.seed, self.epoch, index)
        states = random.getstate(), numpy.random.get_state(), torch.default_generator.get_state()
        random.seed(value)
        numpy.random.seed(value)
        torch.default_generator.manual_seed(value)  # not torch.manual_seed: that would reseed CUDA's generators too
        try:
            return self.dataset[index]
        finally:
            random.setstate(states[0])
            numpy.random.set_state(states[1])
            torch.default_generator.set_state(states[2])


def all_finite(tensors: list) -> bool:
    """Whether every value of `tensors` is finite, in a few kernels: the largest magnitude of each tensor (which,
    unlike a sum or 2-norm, overflows for no finite weights), then one check and one synchronisation."""
    import torch

    if not tensors:
        return True
    with torch.no_grad():
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).all())


@dataclass
class Run:
    """What identifies a run: the model it starts from, the data and the training settings."""

    source: dict  # model spec, checkpoint, pooling configuration
    train_dir: str | None  # None: an hfds/ dataset in the default cache
    val_dir: str | None
    settings: TrainSettings
    world_size: int
    data_options: dict = field(default_factory=dict)  # --dataset, splits, --class-map, preprocessing: those given

    def to_dict(self) -> dict:
        return {"source": self.source, "data": self.train_dir, "val": self.val_dir,
                "settings": self.settings.to_dict(), "world_size": self.world_size,
                **({"data_options": self.data_options} if self.data_options else {})}

    def differences(self, saved: dict) -> list[str]:
        """`key: saved -> now` for each setting that differs from a saved run."""
        now = self.to_dict()
        flat_now = {**{k: v for k, v in now.items() if k != "settings"}, **now["settings"]}
        flat_saved = {**{k: v for k, v in saved.items() if k != "settings"}, **saved.get("settings", {})}
        return [f"{key}: {flat_saved.get(key)!r} -> {value!r}" for key, value in flat_now.items() if flat_saved.get(key) != value]


@dataclass
class FinetuneResult:
    model: object  # the trained converted model (EMA weights with --model-ema), unwrapped, on its device
    history: list[dict]


def prepare_output(out_dir: Path, run: Run, resume: bool, force: bool) -> dict | None:
    """Check the output folder for a new or resumed run; returns the saved checkpoint to resume from, if any."""
    import torch

    settings_path = out_dir / SETTINGS_FILE
    if resume:
        if not settings_path.is_file():
            raise VitpoolError(f"--resume: {out_dir} holds no {SETTINGS_FILE}, so no run to resume; start one without --resume")
        try:
            saved = json.loads(settings_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise VitpoolError(f"--resume: {settings_path} could not be read: {error}") from None
        changed = run.differences(saved)
        if changed:
            raise VitpoolError(f"--resume with other settings than the run in {out_dir} ({'; '.join(changed)}); "
                               f"resume with the same ones, or start anew with --force")
        checkpoint = out_dir / CHECKPOINT_FILE
        if not checkpoint.is_file():
            return None
        try:
            return torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for damaged files
            raise VitpoolError(f"--resume: {checkpoint} could not be read ({' '.join(str(error).split())[:160]}); "
                               f"start anew with --force") from None
    if out_dir.exists():
        if not force:
            raise VitpoolError(f"output {out_dir} already exists; pass --resume to continue its run, --force to start anew, or choose another --out")
        if not out_dir.is_dir():
            raise VitpoolError(f"output {out_dir} exists and is not a folder")
    return None


def clear_output(out_dir: Path) -> None:
    """Remove what an earlier run wrote (only vitpool's own files: --force never empties a user's folder)."""
    for name in (SETTINGS_FILE, CHECKPOINT_FILE, LOG_FILE, models.CONFIG_FILE, models.TIMM_CONFIG_FILE, models.WEIGHTS_FILE):
        (out_dir / name).unlink(missing_ok=True)


def training_transform(model, settings: TrainSettings, preprocess: data.Preprocess = data.Preprocess()):
    """timm's training transform (random resized crop, flip, colour jitter, auto-augment, erasing) for `model`,
    at the size, interpolation, mean and std of its data config with `preprocess`'s overrides."""
    config = data.data_config(model, preprocess)
    return models.import_timm().data.create_transform(
        input_size=config["input_size"], is_training=True, scale=settings.scale, hflip=settings.hflip,
        color_jitter=settings.color_jitter, auto_augment=settings.aa, re_prob=settings.reprob,
        interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
    )


def make_task(student, teacher, settings: TrainSettings, device):
    """timm's training task: logit distillation from the unpooled teacher, or plain classification."""
    from timm.task import ClassificationTask, LogitDistillationTask

    soft = bool(settings.mixup or settings.cutmix)
    criterion = {"soft_targets": True} if soft else {"smoothing": settings.smoothing}
    if not settings.distill:
        return ClassificationTask(student, criterion_kwargs=criterion, device=device, verbose=False)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    # With --distill-only the labels are placeholders: their loss is computed by timm's task and weighted 0.
    return LogitDistillationTask(
        student, teacher, criterion_kwargs=criterion, distill_loss_weight=settings.distill_loss_weight,
        task_loss_weight=0.0 if settings.distill_only else settings.task_loss_weight,
        temperature=settings.kd_temperature, device=device, verbose=False,
    )


def validate(model, teacher, images: data.Images, process: Process, batch_size: int, workers: int,
             preprocess: data.Preprocess = data.Preprocess()) -> dict:
    """Top-1, top-5, agreement with and KL from the teacher; each process scores a share, the counts are summed."""
    import torch
    import torch.distributed as dist

    from vitpool.evaluate import Tally, count

    was_training = model.training
    transform, _ = data.transform_for(model, preprocess)
    batches = images.batches(transform, batch_size, workers, rank=process.rank, world_size=process.world_size)
    tally, _ = count(model, teacher, batches, device=process.device)
    model.train(was_training)
    counts = torch.tensor([tally.n, tally.top1, tally.top5, tally.agree, tally.baseline_top1, tally.kl_sum],
                          dtype=torch.float64, device=process.device)
    if process.world_size > 1:
        dist.all_reduce(counts)
    n, top1, top5, agree, baseline_top1, kl_sum = counts.tolist()
    if n == 0:
        raise VitpoolError("none of the validation images could be read")
    total = Tally(int(n), int(top1), int(top5), int(agree), int(baseline_top1), kl_sum, compared=teacher is not None)
    result = total.result()
    return {"n": result.n, "top1": result.top1, "top5": result.top5, "agreement": result.agreement, "kl": result.kl,
            "teacher_top1": result.baseline_top1}


def write_outputs(out_dir: Path, model, history: list[dict]) -> None:
    models.write_into(model, out_dir)
    write_atomically(out_dir / LOG_FILE, "".join(json.dumps(record) + "\n" for record in history))


@contextmanager
def distributed(device: str | None) -> Iterator[Process]:
    """This process's place in the run. The process group torchrun asks for is set up here and always taken
    down, also when training fails, so that no peer is left waiting on it."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    process = start_process(device)
    try:
        yield process
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Plan:
    """A run checked against its data and output folder before any training: what to train on and from where."""

    run: Run
    checkpoint: dict | None  # the saved state to resume from
    train_images: data.Images
    val_images: data.Images | None
    steps: int  # per epoch and process


def plan_run(student, train_dir, val_dir, out_dir: Path, settings: TrainSettings, source: dict, process: Process,
             resume: bool, force: bool, preprocess: data.Preprocess) -> Plan:
    """Open the data, check the output folder (and the run to resume), and on a new run write its settings."""
    import torch.distributed as dist

    if settings.amp and settings.amp_dtype == "float16" and process.device.type != "cuda":
        raise VitpoolError("--amp-dtype float16 needs a CUDA GPU; on CPU use --amp-dtype bfloat16")
    train_data = data.as_source(train_dir, split="train")
    val_data = data.as_source(val_dir) if val_dir is not None else None
    options = {**train_data.record("train"), **({"val_" + k: v for k, v in val_data.record().items()} if val_data else {}),
               **preprocess.record()}
    run = Run(source, train_data.location(), val_data.location() if val_data else None, settings, process.world_size, options)
    checkpoint = prepare_output(out_dir, run, resume, force)
    train_images = data.open_images(train_data, student.num_classes, labelled=not settings.distill_only)
    if train_images.samples is None:
        raise VitpoolError(f"finetune trains on an image folder, a .tar or hfds/: {train_data} is a stream, which cannot be "
                           f"shuffled and resumed epoch by epoch here (it can be --val)")
    val_images = data.open_images(val_data, student.num_classes) if val_data else None
    steps = len(train_images.samples) // process.world_size // settings.batch_size
    if steps == 0:
        raise VitpoolError(f"{train_data} has {len(train_images.samples)} images, fewer than one batch of {settings.batch_size} "
                           f"for each of {process.world_size} processes; lower --batch-size")
    if process.world_size > 1:
        dist.barrier()  # every process has checked the output before rank 0 writes to it
    if process.main and checkpoint is None:
        writable_parent(out_dir / SETTINGS_FILE)
        if not resume:
            clear_output(out_dir)
        write_atomically(out_dir / SETTINGS_FILE, json.dumps(run.to_dict(), indent=2) + "\n")
    return Plan(run, checkpoint, train_images, val_images, steps)


@dataclass
class Training:
    """The moving parts of a run (timm's task, optimizer, scheduler, EMA, the data of every epoch) and what an
    epoch, a checkpoint and a restart do with them."""

    student: object
    task: object
    optimizer: object
    scheduler: object
    scaler: object | None  # timm's NativeScaler, for float16 on CUDA only
    ema: object | None
    mixup: object | None
    dataset: SeededItems
    sampler: object
    settings: TrainSettings
    process: Process
    steps: int
    out_dir: Path
    updates: int = 0

    @classmethod
    def build(cls, student, teacher, train_images: data.Images, steps: int, settings: TrainSettings, process: Process,
              out_dir: Path, preprocess: data.Preprocess) -> "Training":
        import torch
        from timm.data import Mixup
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import NativeScaler

        student.to(process.device).train()
        task = make_task(student, teacher if settings.distill else None, settings, process.device)
        ema = task.setup_ema(decay=settings.model_ema_decay) if settings.model_ema else None
        optimizer = create_optimizer_v2(student, opt="adamw", lr=settings.lr, weight_decay=settings.weight_decay)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched="cosine", num_epochs=settings.epochs, warmup_epochs=settings.warmup_epochs,
            warmup_lr=settings.warmup_lr, min_lr=settings.min_lr, step_on_epochs=False,
            updates_per_epoch=math.ceil(steps / settings.grad_accum_steps),
        )
        half = settings.amp and settings.amp_dtype == "float16"
        mixup = None
        if settings.mixup or settings.cutmix:
            mixup = Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, label_smoothing=settings.smoothing,
                          num_classes=student.num_classes)
        dataset = SeededItems(train_images.decoded(training_transform(student, settings, preprocess)), settings.seed)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=process.world_size, rank=process.rank,
                                                      shuffle=True, seed=settings.seed, drop_last=True)
        return cls(student, task, optimizer, scheduler, NativeScaler(process.device.type) if half else None,
                   ema, mixup, dataset, sampler, settings, process, steps, out_dir)

    @property
    def final(self):
        """The weights the run hands on: the EMA's with --model-ema."""
        return self.ema.module if self.ema is not None else self.student

    def restore(self, checkpoint: dict) -> tuple[list[dict], int]:
        """Load a saved state; returns the history so far and the first epoch to train."""
        self.student.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(checkpoint["model_ema"])
        epoch = int(checkpoint["epoch"])
        self.updates = epoch * math.ceil(self.steps / self.settings.grad_accum_steps)
        return list(checkpoint["history"]), epoch + 1

    def save(self, epoch: int, history: list[dict], run: Run) -> None:
        """`checkpoint.pt`: all that --resume needs to go on after `epoch` (written atomically)."""
        import torch
        from timm.utils import unwrap_model

        state = {"epoch": epoch, "model": unwrap_model(self.student).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "history": history, "run": run.to_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomically(self.out_dir / CHECKPOINT_FILE, buffer.getvalue())

    def epoch(self, epoch: int, workers: int, on_step: Callable[[int, int, int, dict], None] | None) -> dict:
        """Train one epoch (its randomness from the seed, the epoch and the rank alone); its record for the log."""
        import torch
        import torch.distributed as dist

        settings, process = self.settings, self.process
        loader_seed = seed_epoch(settings.seed, epoch, process.rank)
        self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch  # before the loader starts this epoch's workers, which take a copy of the dataset
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=settings.batch_size, sampler=self.sampler, num_workers=workers, collate_fn=data.collate,
            drop_last=True, generator=torch.Generator().manual_seed(loader_seed), persistent_workers=False,
        )
        sums = torch.zeros(4, dtype=torch.float64)  # loss, task loss, distillation loss, images
        skipped = 0
        started = time.perf_counter()
        for step, (images, labels, bad) in enumerate(data.reading(loader), start=1):
            skipped += len(bad)
            last_of_update = step % settings.grad_accum_steps == 0 or step == self.steps
            if images is not None:
                sums += self._forward_backward(images, labels, epoch, step, last_of_update)
            elif last_of_update:  # no image of this batch could be read: the update applies the earlier batches'
                self._backward(None, epoch, step, update=True)
            if process.main and on_step:
                elapsed = time.perf_counter() - started
                on_step(epoch, step, self.steps, {"loss": float(sums[0] / max(step, 1)), "lr": self.optimizer.param_groups[0]["lr"],
                                                  "images_per_s": float(sums[3]) * process.world_size / max(elapsed, 1e-9)})
        seconds = time.perf_counter() - started
        if process.world_size > 1:
            dist.all_reduce(sums)
        batches = self.steps * process.world_size
        return {
            "epoch": epoch,
            "train_loss": float(sums[0]) / batches,
            "task_loss": float(sums[1]) / batches,
            "kd_loss": float(sums[2]) / batches if settings.distill else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images": int(sums[3]),
            "images_per_s": float(sums[3]) / seconds,
            "seconds": seconds,
            "skipped": skipped,
        }

    def _forward_backward(self, images, labels, epoch: int, step: int, last_of_update: bool):
        """One batch's loss and gradients (summed into the update's); [loss, task loss, distillation loss, images]."""
        import torch

        settings, device = self.settings, self.process.device
        if self.mixup is not None and len(images) % 2:
            images, labels = images[:-1], labels[:-1]  # an unreadable image left an odd batch
        images, labels = images.to(device), labels.to(device)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        autocast = torch.autocast(device.type, dtype=getattr(torch, settings.amp_dtype)) if settings.amp else nullcontext()
        with nullcontext() if last_of_update else self.task.no_sync():
            with autocast:
                try:
                    out = self.task(images, targets)
                except ValueError as error:  # token pooling refuses NaN/inf tokens: huge weights overflowed
                    if self.updates == 0 or "NaN or infinite" not in str(error):
                        raise
                    raise self._diverged(f"the model's activations became NaN or infinite ({str(error).split(';')[0]})",
                                         epoch, step) from None
            parts = (out["loss"], out.get("task_loss", out["loss"]), out.get("kd_loss"))  # without a teacher all is label loss
            losses = [float(part.detach()) if part is not None else 0.0 for part in parts]
            if not math.isfinite(losses[0]):
                raise VitpoolError(f"the loss became {losses[0]} at epoch {epoch}, step {step}; {self.out_dir} keeps "
                                   f"{self._kept(epoch)}: start anew with a lower --lr (or --clip-grad) and --force")
            self._backward(out["loss"] / settings.grad_accum_steps, epoch, step, update=last_of_update)
        return torch.tensor([*losses, len(images)], dtype=torch.float64)

    def _backward(self, loss, epoch: int, step: int, update: bool) -> None:
        """Add `loss`'s gradients (None: a batch with no readable image adds none) to the update's and, at its end,
        apply them: timm's NativeScaler scales, unscales, clips and steps; without one, clipping and the step.
        Then the scheduler and the EMA; the weights are checked to be finite."""
        import torch
        from timm.utils import dispatch_clip_grad

        settings, optimizer, scaler = self.settings, self.optimizer, self.scaler
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]] if update else []
        if update and loss is None and all(parameter.grad is None for parameter in parameters):
            self._updated()  # no batch of this update could be read: nothing to apply
            return
        try:
            if scaler is not None:
                loss = torch.zeros((), device=self.process.device, requires_grad=True) if loss is None else loss
                scaler(loss, optimizer, clip_grad=settings.clip_grad, clip_mode=settings.clip_mode,
                       parameters=self.task.get_clip_parameters(), need_update=update)
            else:
                if loss is not None:
                    loss.backward()
                if update:
                    if settings.clip_grad is not None:
                        dispatch_clip_grad(self.task.get_clip_parameters(), settings.clip_grad, mode=settings.clip_mode)
                    optimizer.step()
        except RuntimeError as error:  # e.g. a step size past float32: "value cannot be converted ... overflow"
            if "overflow" not in str(error):
                raise
            raise self._diverged(f"the update overflowed ({' '.join(str(error).split())[:100]})", epoch, step) from None
        if update:
            if not all_finite(parameters):
                raise self._diverged("the weights became NaN or infinite in the update", epoch, step)
            self._updated()

    def _updated(self) -> None:
        """Close an update: clear the gradients, step the scheduler and the EMA."""
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.scheduler.step_update(num_updates=self.updates)
        self.task.update_ema(step=self.updates)

    def _kept(self, epoch: int) -> str:
        """What OUT holds while `epoch` runs: nothing of it is written before it finishes."""
        return f"epoch {epoch - 1}'s model" if epoch > 1 else "the model it started from"

    def _diverged(self, what: str, epoch: int, step: int) -> VitpoolError:
        return VitpoolError(f"{what} at epoch {epoch}, step {step} (learning rate {self.optimizer.param_groups[0]['lr']:.3g}); "
                            f"{self.out_dir} keeps {self._kept(epoch)}: start anew with a lower --lr (or --clip-grad) and --force")

    def release(self) -> None:
        """Free DDP's reducer, which holds the process group, while every peer is still there; then meet them."""
        import torch.distributed as dist

        if self.process.world_size > 1:
            self.task.trainable_module = self.student
            gc.collect()
            dist.barrier()


def finetune(
    student,
    teacher,
    train_dir: str | Path | data.Source,
    out_dir: str | Path,
    settings: TrainSettings,
    source: dict,
    val_dir: str | Path | data.Source | None = None,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    workers: int = 2,
    on_step: Callable[[int, int, int, dict], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    preprocess: data.Preprocess = data.Preprocess(),
) -> FinetuneResult:
    """Train the converted `student` (pooling fixed) from its current weights; `teacher` is its unpooled original.
    `train_dir` and `val_dir` are data.Sources (an image folder, a .tar or hfds/; the training split defaults to
    train) or paths of an image folder or .tar.

    `on_step(epoch, step, steps, stats)` and `on_epoch(record)` are called on rank 0 only.
    """
    settings.check()
    out_dir = Path(out_dir)
    with distributed(device) as process:
        plan = plan_run(student, train_dir, val_dir, out_dir, settings, source, process, resume, force, preprocess)
        teacher = teacher.to(process.device).eval() if teacher is not None else None
        training = Training.build(student, teacher, plan.train_images, plan.steps, settings, process, out_dir, preprocess)
        history, first_epoch = training.restore(plan.checkpoint) if plan.checkpoint is not None else ([], 1)
        if process.world_size > 1:
            training.task.prepare_distributed(device_ids=[process.device.index] if process.device.type == "cuda" else None)

        def validated(record: dict) -> dict:
            if plan.val_images is not None:
                record["val"] = validate(training.final, teacher, plan.val_images, process, settings.batch_size, workers,
                                         preprocess)
            return record

        if plan.checkpoint is None:
            if plan.val_images is not None:
                history.append(validated({"epoch": 0}))
                if process.main and on_epoch:
                    on_epoch(history[-1])
            if process.main:
                write_outputs(out_dir, training.final, history)
        for epoch in range(first_epoch, settings.epochs + 1):
            history.append(validated(training.epoch(epoch, workers, on_step)))
            if process.main:
                training.save(epoch, history, plan.run)
                write_outputs(out_dir, training.final, history)
                if on_epoch:
                    on_epoch(history[-1])
        if process.main and plan.checkpoint is not None and first_epoch > settings.epochs:
            write_outputs(out_dir, training.final, history)  # a finished run resumed: its model files are rewritten
        training.release()
    return FinetuneResult(training.final.eval(), history)
