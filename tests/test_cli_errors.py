"""The `vitpool` command line on bad input: exit code 2, one `error:` line on stderr, no traceback, nothing written.

What depends on the process runs the installed console script in a subprocess, as a user would: the hub's
offline handling (read from the environment at import), a pickle that would run code, and the commands whose
stdout must be pure JSON (a library writing to the file descriptor would break it). Those start at once on a
small thread pool (one per core), since a fresh interpreter spends ~3 s importing torch and timm, and each test
waits for its own result. The other refusals run `vitpool.cli.main`, the console script's function, in this
process, with its exit code, stdout, stderr, warnings and log records captured as a fresh interpreter would
print them. Nothing needs the network: hub access is switched off with HF_HUB_OFFLINE=1 (or pointed at a closed
local port), and weights come from --no-pretrained, --checkpoint or ../shared/data, read in place (tests that
need the real data skip where it is absent).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Result, assert_user_error, pickle_that_runs_code, run_in_process

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_WEIGHTS = DATA / "weights" / "deit_tiny_patch16_224.pth"
IMAGES = DATA / "imagenet-sample"
VITPOOL = Path(sys.executable).parent / "vitpool"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def run_vitpool(args: list[str], env: dict, cwd: Path, timeout: float) -> Result:
    start = time.monotonic()
    try:
        done = subprocess.run([str(VITPOOL), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        text = lambda b: (b.decode(errors="replace") if isinstance(b, bytes) else b) or ""  # noqa: E731
        return Result(args, None, text(expired.stdout), text(expired.stderr), time.monotonic() - start, True)
    return Result(args, done.returncode, done.stdout, done.stderr, time.monotonic() - start)


@dataclass
class Case:
    args: list[str]
    expect: list[str] = field(default_factory=list)  # fragments the error line must contain
    work: Path | None = None  # a folder holding the output path; after a refusal it must be as before
    future: Future | None = None  # a console-script subprocess; None: run in this process when asked
    done: Result | None = None


class Runs:
    """Cases: console-script subprocesses started in the background (`start`), and cases run in this process
    (`add`); `result(name)` waits for the one or runs the other."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FORCE_COLOR", "PY_COLORS"))}
        self.env.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf-home"), NO_COLOR="1", TERM="dumb", OMP_NUM_THREADS="1")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
        self.pool = ThreadPoolExecutor(max_workers=max(2, min(4, cores)))
        self.cases: dict[str, Case] = {}
        self.snapshots: dict[str, list[str]] = {}
        self.not_started: dict[str, str] = {}  # case -> why it cannot run here

    def workdir(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir()
        return folder

    def add(self, name: str, args: list[str], expect=(), work: Path | None = None) -> Case:
        case = Case([str(a) for a in args], list(expect), work)
        if work is not None:
            self.snapshots[name] = snapshot(work)
        self.cases[name] = case
        return case

    def start(self, name: str, args: list[str], expect=(), work: Path | None = None, env=None, timeout=900.0, pool=None):
        case = self.add(name, args, expect, work)
        case.future = (pool or self.pool).submit(run_vitpool, case.args, env or self.env, self.root, timeout)

    def result(self, name: str) -> Result:
        if name in self.not_started:
            pytest.skip(self.not_started[name])
        case = self.cases[name]
        if case.future is not None:
            return case.future.result()
        if case.done is None:
            case.done = run_in_process(case.args)
        return case.done


def snapshot(folder: Path) -> list[str]:
    """Every path under `folder` with the content of its files: a refused command must leave it as it was."""
    entries = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        entries.append(f"{rel}:{hashlib.sha256(path.read_bytes()).hexdigest()}" if path.is_file() else rel + "/")
    return entries


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# A guard against hanging, not a speed check: the retries an unreachable hub costs without vitpool's offline
# switch show as warning lines on stderr, which assert_user_error refuses (it wants exactly one line).
OFFLINE_DEFAULT_TIMEOUT = 900.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    runs = Runs(root)
    slow_pool = ThreadPoolExecutor(max_workers=1)  # a case that mostly sleeps should not hold a core's slot
    locked: list[Path] = []

    # The offline case as a user meets it: no HF_HUB_OFFLINE, the hub just unreachable (a closed local port).
    offline_env = {k: v for k, v in runs.env.items() if k != "HF_HUB_OFFLINE"}
    offline_env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    work = runs.workdir("offline_default")
    runs.start("offline_default", ["convert", "deit_tiny", "--k", "100", "--out", work / "out"], work=work,
               env=offline_env, timeout=OFFLINE_DEFAULT_TIMEOUT, pool=slow_pool)

    def convert_error(name, args, expect, console_script=False):
        work = runs.workdir(name)
        (runs.start if console_script else runs.add)(name, ["convert", *args, "--out", work / "out"], expect, work)

    # Cases that need no prepared files start first.
    convert_error("unknown_model", ["deit_tiny_patch16_22", "--k", "100", "--no-pretrained"],
                  ["unknown model", "did you mean", "deit_tiny_patch16_224"])
    convert_error("k_zero", ["deit_tiny", "--k", "0", "--no-pretrained"], ["K must be at least 1"])
    convert_error("k_too_large", ["deit_tiny", "--k", "300", "--no-pretrained"], ["K=300", "196 patch tokens"])
    convert_error("k_layers_count", ["deit_tiny", "--k", "100,50", "--layers", "3", "--no-pretrained"],
                  ["--k has 2 values", "--layers has 1"])
    convert_error("layer_out_of_range", ["deit_tiny", "--k", "100", "--layers", "12", "--no-pretrained"],
                  ["block index 12", "0..11"])
    convert_error("k_not_integers", ["deit_tiny", "--k", "a,b", "--no-pretrained"], ["--k must be a comma list of integers", "'a,b'"])
    convert_error("no_k", ["deit_tiny", "--no-pretrained"], ["convert needs --k"])
    convert_error("missing_checkpoint", ["deit_tiny", "--k", "100", "--checkpoint", root / "nowhere.pth"],
                  ["nowhere.pth", "does not exist"])
    convert_error("offline_pretrained", ["deit_tiny", "--k", "100"],
                  ["could not load pretrained weights", "--checkpoint", "--no-pretrained"], console_script=True)

    work = runs.workdir("parent_is_file")
    (work / "afile").write_text("not a folder\n")
    runs.add("parent_is_file", ["convert", "deit_tiny", "--k", "100", "--no-pretrained", "--out", work / "afile" / "out"],
             ["cannot write", "afile"], work)
    if IS_ROOT:
        runs.not_started["readonly_parent"] = "running as root, which writes through directory permissions (see test_convert_write_failure_is_a_user_error)"
    else:
        work = runs.workdir("readonly_parent")
        (work / "locked").mkdir()
        (work / "locked").chmod(0o555)
        locked.append(work / "locked")
        runs.add("readonly_parent", ["convert", "deit_tiny", "--k", "100", "--no-pretrained", "--out", work / "locked" / "out"],
                 ["no permission"], work)

    for name in ("existing_out", "existing_out_force", "user_folder_force"):
        work = runs.workdir(name)
        (work / "out").mkdir()
        (work / "out" / ("vitpool.json" if name == "existing_out_force" else "keep.txt")).write_text("precious\n")
    runs.add("existing_out", ["convert", "deit_tiny", "--k", "100", "--no-pretrained", "--out", root / "existing_out" / "out"],
             ["already exists", "--force"], root / "existing_out")
    runs.add("user_folder_force", ["convert", "deit_tiny", "--k", "100", "--no-pretrained", "--force",
                                   "--out", root / "user_folder_force" / "out"], ["not a saved model"], root / "user_folder_force")
    runs.start("existing_out_force", ["convert", "deit_tiny", "--k", "100", "--no-pretrained", "--force", "--json",
                                      "--out", root / "existing_out_force" / "out"])

    empty = runs.workdir("empty_data")
    (empty / "n01440764").mkdir()
    (empty / "n01440764" / "notes.txt").write_text("not an image\n")
    runs.add("eval_no_images", ["eval", "deit_tiny", "--no-pretrained", "--data", empty, "--workers", "0"],
             ["no images found", str(empty)], empty)

    runs.start("flops_json", ["flops", "deit_tiny", "--k", "98", "--layers", "5", "--method", "kmeans", "--json"])

    if IMAGES.is_dir():
        folder = runs.workdir("eval_images")
        wnids = sorted(p.name for p in IMAGES.iterdir() if p.is_dir())[:3]
        for wnid in wnids:
            (folder / wnid).mkdir()
            for image in sorted((IMAGES / wnid).iterdir())[:1]:
                shutil.copy(image, folder / wnid / image.name)
        corrupt = folder / wnids[0] / "zz_corrupt.JPEG"
        corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" + bytes(64))
        weights = ["--checkpoint", REAL_WEIGHTS] if REAL_WEIGHTS.is_file() else ["--no-pretrained"]
        runs.start("eval_corrupt", ["eval", "deit_tiny", *weights, "--data", folder, "--k", "150", "--json",
                                    "--batch-size", "2", "--workers", "1"])

    # Files that need torch to make.
    from vitpool import models
    import torch

    import vitpool

    timm = models.import_timm()
    torch.manual_seed(0)
    tiny = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.save(tiny.state_dict(), ckpt / "tiny.pth")
    blob = (ckpt / "tiny.pth").read_bytes()
    (ckpt / "truncated.pth").write_bytes(blob[: len(blob) // 2])
    marker = root / "pwned"
    pickle_that_runs_code(ckpt / "evil.pth", marker)
    converted = root / "converted"
    vitpool.save(vitpool.convert(tiny, k=[120], layers=[4]), converted)
    runs.converted_snapshot = snapshot(converted)
    runs.marker = marker

    convert_error("truncated_checkpoint", ["deit_tiny", "--k", "100", "--checkpoint", ckpt / "truncated.pth"],
                  ["truncated.pth", "could not be read"])
    convert_error("pickle_with_code", ["deit_tiny", "--k", "100", "--checkpoint", ckpt / "evil.pth"],
                  ["evil.pth", "refused"], console_script=True)
    convert_error("mismatched_checkpoint", ["deit_small", "--k", "100", "--checkpoint", ckpt / "tiny.pth"],
                  ["does not match the model", "(1, 1, 192) in the file and (1, 1, 384) in the model"])
    convert_error("convert_saved_dir", [converted, "--k", "50"], ["is a saved model"])
    runs.add("flops_converted_with_k", ["flops", converted, "--k", "50"], ["already converted", "--k", "deit_tiny_patch16_224"])
    runs.add("eval_converted_with_iters", ["eval", converted, "--iters", "3", "--data", empty],
             ["already converted", "--iters"])

    work = runs.workdir("sweep_bad_budgets")
    runs.add("sweep_bad_budgets", ["sweep", "deit_tiny", "--no-pretrained", "--data", empty, "--out", work / "s",
                                   "--budgets", "0.6,1.5"], ["--budgets", "'0.6,1.5'"], work)
    work = runs.workdir("sweep_other_settings")
    (work / "s").mkdir()
    (work / "s" / "results.json").write_text(json.dumps({"settings": {"model": "deit_small_patch16_224"}, "points": []}))
    runs.add("sweep_other_settings", ["sweep", "deit_tiny", "--no-pretrained", "--data", empty, "--out", work / "s"],
             ["other settings", "model", "--force"], work)
    work = runs.workdir("visualize_missing_image")
    runs.add("visualize_missing_image", ["visualize", converted, root / "nope.jpg", "--out", work / "v.png"],
             ["nope.jpg", "does not exist"], work)
    work = runs.workdir("visualize_existing_out")
    (work / "v.png").write_bytes(b"keep")
    runs.add("visualize_existing_out", ["visualize", converted, root / "nope.jpg", "--out", work / "v.png"],
             ["already exists", "--force"], work)
    work = runs.workdir("visualize_parent_is_file")
    (work / "afile").write_text("not a folder\n")
    runs.add("visualize_parent_is_file", ["visualize", converted, root / "nope.jpg", "--out", work / "afile" / "v.png"],
             ["cannot write", "afile"], work)
    work = runs.workdir("visualize_unpooled")
    (work / "photo.png").write_bytes((ckpt / "tiny.pth").read_bytes()[:10])
    runs.add("visualize_unpooled", ["visualize", "deit_tiny", "--no-pretrained", work / "photo.png", "--out", work / "v.png"],
             ["converted model", "--k"], work)
    try:
        yield runs
    finally:
        runs.pool.shutdown(wait=True, cancel_futures=True)
        slow_pool.shutdown(wait=True, cancel_futures=True)
        for path in locked:
            path.chmod(0o755)


REFUSALS = [
    "unknown_model",
    "k_zero",
    "k_too_large",
    "k_layers_count",
    "layer_out_of_range",
    "k_not_integers",
    "no_k",
    "missing_checkpoint",
    "truncated_checkpoint",
    "pickle_with_code",
    "mismatched_checkpoint",
    "offline_pretrained",
    "parent_is_file",
    "readonly_parent",
    "existing_out",
    "user_folder_force",
    "convert_saved_dir",
]


@pytest.mark.parametrize("name", REFUSALS)
def test_convert_refusal_writes_nothing(runs, name):
    result = runs.result(name)
    case = runs.cases[name]
    assert_user_error(result, case.expect)
    assert snapshot(case.work) == runs.snapshots[name], "the refused command changed its output folder"


def test_pickle_with_code_did_not_run(runs):
    assert_user_error(runs.result("pickle_with_code"))
    assert not runs.marker.exists(), "loading the checkpoint ran the pickled os.system call"


def test_existing_out_is_kept(runs):
    assert_user_error(runs.result("existing_out"))
    out = runs.root / "existing_out" / "out"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious\n"


def test_existing_out_with_force_is_replaced(runs):
    result = runs.result("existing_out_force")
    assert result.rc == 0, str(result)
    work = runs.root / "existing_out_force"
    out = work / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vitpool.json"]
    assert hidden_entries(work) == [], "staging or retired directories were left behind"
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out) and summary["base_model"] == "deit_tiny_patch16_224"
    assert summary["pooling"]["k"] == [100] and summary["pooling"]["layers"] == [6]  # one K: the middle block
    description = json.loads((out / "vitpool.json").read_text())
    assert description["pooling"] == summary["pooling"]


@pytest.mark.parametrize("name", ["sweep_bad_budgets", "sweep_other_settings", "visualize_missing_image",
                                  "visualize_existing_out", "visualize_parent_is_file", "visualize_unpooled"])
def test_sweep_and_visualize_refusals_write_nothing(runs, name):
    assert_user_error(runs.result(name), runs.cases[name].expect)
    assert snapshot(runs.cases[name].work) == runs.snapshots[name]


@pytest.mark.parametrize("name", ["flops_converted_with_k", "eval_converted_with_iters"])
def test_pooling_flags_on_converted_dir(runs, name):
    assert_user_error(runs.result(name), runs.cases[name].expect)
    assert snapshot(runs.root / "converted") == runs.converted_snapshot


def test_eval_without_images(runs):
    assert_user_error(runs.result("eval_no_images"), runs.cases["eval_no_images"].expect)


def test_offline_pretrained_default_env_fails_fast_with_one_line(runs):
    result = runs.result("offline_default")
    assert_user_error(result, ["--checkpoint", "--no-pretrained"])
    assert not (runs.root / "offline_default" / "out").exists()


def test_flops_json_is_pure_json(runs):
    result = runs.result("flops_json")
    assert result.rc == 0, str(result)
    document = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert {"gmacs", "baseline_gmacs", "pooling_gmacs", "blocks"} <= set(document)
    assert document["model"] == "deit_tiny_patch16_224"
    assert document["pooling"]["k"] == [98] and document["pooling"]["method"] == "kmeans"
    blocks = document["blocks"]
    assert len(blocks) == 12
    assert all(b["tokens_in"] == b["tokens_out"] == 197 for b in blocks[:5])
    assert blocks[5]["tokens_in"] == 197 and blocks[5]["tokens_out"] == 99
    assert all(b["tokens_in"] == b["tokens_out"] == 99 for b in blocks[6:11])
    assert blocks[11]["tokens_in"] == 99 and blocks[11]["tokens_out"] == 1  # its MLP on the class token only
    assert 1.1 < document["baseline_gmacs"] < 1.4  # unpooled DeiT-Tiny: about 1.26 GMACs
    assert document["pooling_gmacs"] > 0
    assert document["pooling_gmacs"] < document["gmacs"] < document["baseline_gmacs"]
    assert "Traceback" not in result.stderr


def test_eval_json_skips_unreadable_image(runs):
    if not IMAGES.is_dir():
        pytest.skip(f"real images {IMAGES} are absent (see ../shared/data/README.md)")
    result = runs.result("eval_corrupt")
    assert result.rc == 0, str(result)
    document = json.loads(result.stdout)
    assert document["n"] == 3
    assert document["class_mapping"] == "imagenet"
    assert len(document["skipped"]) == 1 and "zz_corrupt.JPEG" in document["skipped"][0]
    assert document["agreement"] is not None and 0 <= document["agreement"] <= 100
    if REAL_WEIGHTS.is_file():
        assert document["baseline_top1"] >= 100 * 2 / 3 - 1e-6, "the real DeiT-Tiny should get 2 of these 3 photos"
    warnings = [line for line in result.lines() if "zz_corrupt.JPEG" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), str(result)
    assert "Traceback" not in result.stderr


HANG_GUARD = 900  # seconds: a guard against a hang, never a speed check (a loaded machine is slow)


def test_cli_imports_without_torch():
    code = "import vitpool.cli, sys; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr


def test_help_answers_without_error():
    done = subprocess.run([str(VITPOOL), "--help"], capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    for command in ("convert", "flops", "eval"):
        assert command in done.stdout


def test_convert_write_failure_is_a_user_error(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    result = run_in_process(["convert", "deit_tiny", "--k", "100", "--no-pretrained", "--out", tmp_path / "out"])
    assert not (tmp_path / "out").exists() and hidden_entries(tmp_path) == []
    assert_user_error(result, ["No space left"])
