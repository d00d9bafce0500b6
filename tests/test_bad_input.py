"""Bad input that used to escape the one-line promise: option values that do not parse, opsets the exporter
cannot write, names too long for the file system, leftovers of killed writers, and the smaller cases. Run in
process through the console script's `main()` (one `error:` line on stderr, exit 2), so each costs well under
a second where no model is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import assert_user_error, run_in_process

from vitpool.errors import VitpoolError
from vitpool.outputs import remove_leftovers, temporary_prefix, write_atomically

TINY = ["deit_tiny", "--no-pretrained"]


@pytest.mark.parametrize("args, words", [
    (["convert", *TINY, "--budget", "abc", "--out", "x"], ["'--budget'", "valid number"]),
    (["convert", *TINY, "--iters", "five", "--k", "10", "--out", "x"], ["'--iters'", "integer"]),
    (["bench", *TINY, "--k", "100", "--threads", "0"], ["'--threads'"]),
    (["export", *TINY, "--min-agreement", "101", "--out", "x.onnx"], ["'--min-agreement'", "100"]),
    (["visualize", *TINY, "--k", "100", "img.png", "--scale", "0", "--out", "v.png"], ["'--scale'"]),
    (["schedule", "deit_tiny", "--k", "10", "--out", "s.json"], ["No such option: --k"]),
    (["export", *TINY, "--opset", "5", "--out", "x.onnx"], ["--opset 5", "choose 17 to"]),
    (["export", *TINY, "--opset", "99", "--out", "x.onnx"], ["--opset 99"]),
    (["convert", *TINY, "--budget", "2", "--out", "x"], ["--budget", "(0, 1]"]),
    (["flops", "deit_tiny", "--target-gmacs", "-1"], ["--target-gmacs", "positive"]),
    (["bench", *TINY, "--k", "100", "--runtime", ","], ["--runtime takes a comma list"]),
    (["convert", *TINY, "--k", "100", "--out", "n" * 256], ["256 bytes", "at most 255"]),
    (["convert", *TINY, "--k", "100", "--out", "/".join(["d" * 250] * 17)], ["paths are at most 4095"]),
])
def test_bad_values_are_one_line_and_exit_2(args, words, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run_in_process(args), words)
    assert list(tmp_path.iterdir()) == []


def test_a_legal_long_name_is_written(tmp_path):
    """250 characters is a legal name: the temporary sibling's longer name must not refuse it."""
    out = tmp_path / ("m" * 250)
    result = run_in_process(["convert", *TINY, "--k", "100", "--out", out])
    assert result.rc == 0, result
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vitpool.json"]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_an_opset_the_exporter_cannot_reach_writes_nothing(tmp_path):
    import vitpool
    from vitpool.export import export
    from vitpool.models import create_model

    model = vitpool.convert(create_model("deit_tiny", pretrained=False, depth=2), k=[100], layers=[0])
    with pytest.raises(VitpoolError, match="cannot convert this model to opset 27 .* choose another --opset"):
        export(model, tmp_path / "m.onnx", opset=27, run_check=False)
    assert list(tmp_path.iterdir()) == []


def test_a_later_writer_removes_what_a_killed_one_left(tmp_path):
    """Temporaries carry their writer's process id: a dead writer's go, a live writer's stay."""
    target = tmp_path / "result.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    prefix = f".{target.name}."
    dead_file = tmp_path / f"{prefix}{dead_pid}.abc123.partial"
    dead_dir = tmp_path / f"{prefix}{dead_pid}.def456.tmp"
    dead_old = tmp_path / f"{prefix}{dead_pid}.ghi789.old"
    live_file = tmp_path / f"{temporary_prefix(target)}jkl012.partial"
    other = tmp_path / ".unrelated.123.abc.tmp"
    dead_file.write_text("half")
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"x" * 100)
    dead_old.mkdir()
    live_file.write_text("in progress")
    other.write_text("not ours")
    write_atomically(target, "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live_file.name, other.name])
    remove_leftovers(target)  # our own process is alive: its temporary stays
    assert live_file.exists()


def test_sweep_budgets_and_methods_are_each_computed_once():
    from vitpool.sweep import parse_budgets, parse_methods

    assert parse_budgets("0.6,0.6,0.5,0.6") == [0.6, 0.5]
    assert parse_methods("tome,kmedoids,tome") == ["tome", "kmedoids"]


def test_a_batch_larger_than_memory_is_refused_before_any_work():
    import vitpool
    from vitpool.bench import bench
    from vitpool.models import create_model

    model = create_model("deit_tiny", pretrained=False, depth=1)
    with pytest.raises(VitpoolError, match=r"--batch-size 100000000 needs [\d.]+ GiB for its input images alone"):
        bench(model, vitpool.convert(model, k=[100], layers=[0]), ["torch"], [1, 100_000_000])


def test_visualize_says_a_folder_is_not_an_image(tmp_path):
    args = ["visualize", *TINY, "--k", "100", tmp_path, "--out", tmp_path / "v.png"]
    assert_user_error(run_in_process(args), ["is a folder: give one image file"])


def test_help_and_success_keep_their_exit_codes():
    result = run_in_process(["--help"])
    assert result.rc == 0 and "convert" in result.stdout, result
    result = run_in_process(["flops", "deit_tiny", "--k", "100", "--json"])
    assert result.rc == 0 and '"ratio"' in result.stdout, result


def test_unknown_command_is_one_line():
    assert_user_error(run_in_process(["frobnicate"]), ["No such command"])


def test_a_saved_model_with_nan_weights_is_named_not_a_traceback(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "m"
    assert run_in_process(["convert", *TINY, "--k", "100", "--out", out]).rc == 0
    weights = load_file(out / "model.safetensors")
    weights["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(weights, out / "model.safetensors")
    images = tmp_path / "images"
    assert_user_error(run_in_process(["eval", out, "--data", images]),
                      ["holds NaN or infinite values (first in blocks.3.mlp.fc1.weight)"])
    assert torch.isnan(load_file(out / "model.safetensors")["blocks.3.mlp.fc1.weight"]).any()  # left as it was
