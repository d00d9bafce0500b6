"""The tables the commands print, one function per result; `--json` prints the results' own `to_json()` instead."""

from __future__ import annotations

from rich import box
from rich.table import Table


def k_after_layers(k, layers) -> str:
    """A schedule as the tables print it: `K,... after BLOCK,...`."""
    return f"{','.join(map(str, k))} after {','.join(map(str, layers))}"


def flops_table(name: str, report) -> Table:
    """`vitpool flops`: a flops.MacReport per block."""
    table = Table(title=f"{name}: MACs at batch 1, input {'x'.join(map(str, report.input_size))}")
    for column in ("block", "tokens in", "tokens out", "block GMACs", "pooling GMACs"):
        table.add_column(column, justify="right")
    for b in report.blocks:
        table.add_row(str(b.index), str(b.tokens_in), str(b.tokens_out), f"{b.block_macs / 1e9:.4f}", f"{b.pool_macs / 1e9:.4f}" if b.pool_macs else "")
    return table


def eval_table(name: str, source, result) -> Table:
    """`vitpool eval`: an evaluate.EvalResult."""
    table = Table(title=f"{name} on {source} ({result.n} images, {result.mapping} class mapping)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("top-1 (%)", f"{result.top1:.2f}")
    table.add_row("top-5 (%)", f"{result.top5:.2f}")
    if result.agreement is not None:
        table.add_row("unpooled top-1 (%)", f"{result.baseline_top1:.2f}")
        table.add_row("agreement with unpooled (%)", f"{result.agreement:.2f}")
        table.add_row("KL(unpooled || pooled), nats", f"{result.kl:.4f}")
    return table


def bench_table(name: str, config, rows) -> Table:
    """`vitpool bench`: its BenchRows, for the converted model with `config`."""
    table = Table(title=f"{name}, {config.describe()}")
    for column in ("model", "runtime", "device", "precision", "batch", "p50 ms", "p90 ms", "images/s", "peak MB", "GMACs/img", "speed-up", "MAC speed-up", "efficiency", "1st call s"):
        table.add_column(column, justify="left" if column in ("model", "runtime", "device", "precision") else "right")
    fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
    for r in rows:
        table.add_row(r.model, r.runtime + (", optimized" if r.optimized else ""), r.device, r.precision, str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
                      f"{r.images_per_s:.1f}", fmt(r.peak_mem_mb, ".0f"), f"{r.gmacs:.3f}", fmt(r.speedup, ".2f"),
                      fmt(r.mac_speedup, ".2f"), fmt(r.efficiency, ".2f"), fmt(r.first_call_s, ".1f"))
    return table


def export_lines(result) -> list[str]:
    """`vitpool export`: what was written, how it was checked, and what the optimizer fused."""
    from vitpool.export import LOGIT_ATOL

    passes = ", ".join(([] if not result.optimized else ["optimized"]) + ([] if result.precision == "fp32" else [result.precision]))
    lines = [f"wrote {result.path} ({result.size_mb:.1f} MB, opset {result.opset}, input {result.input_name} "
             f"{result.input_shape}{', stops at fixed point' if result.stops_at_fixed_point else ''}"
             f"{', ' + passes if passes else ''}, exported in {result.seconds:.1f} s)"]
    if result.check is not None:
        c = result.check
        lines.append(f"ONNX Runtime vs PyTorch on {c.n} {'random inputs' if c.source == 'random' else 'images from ' + c.source}: "
                     f"top-1 agreement {c.agreement:.1f}% (required {c.min_agreement:.0f}%), logits within {LOGIT_ATOL:g} "
                     f"on {c.close:.1f}%, max abs diff {c.max_abs_diff:.3g}")
        if c.unpooled_agreement is not None:
            lines.append(f"the unpooled model through the same passes: top-1 agreement {c.unpooled_agreement:.1f}% with its PyTorch")
    if result.fusion is not None:
        fused, unpooled = result.fusion.fused, result.fusion.unpooled_fused
        lines.append("fused: " + ", ".join(f"{op} {n}" + ("" if unpooled is None else f" (unpooled {unpooled[op]})")
                                            for op, n in fused.items() if n or (unpooled and unpooled[op])))
        lines += [f"not fused: {reason}" for reason in result.fusion.not_fused]
    return lines


def schedule_table(name: str, document: dict) -> Table:
    """`vitpool schedule`: the budget family's schedule and the searched one, as written to its JSON file."""
    table = Table(title=f"{name}, {document['method']} at {document['mac_ratio']:.3f} of the MACs, "
                        f"on {document['calibration_images']} calibration images")
    for column in ("schedule", "K after blocks", "KL (nats)", "agreement (%)"):
        table.add_column(column, justify="left" if column in ("schedule", "K after blocks") else "right")
    family = document["family"]
    table.add_row("--budget", k_after_layers(family["k"], family["layers"]), f"{family['kl']:.4f}", f"{family['agreement']:.1f}")
    table.add_row("searched", k_after_layers(document["k"], document["layers"]), f"{document['calibration']['kl']:.4f}",
                  f"{document['calibration']['agreement']:.1f}")
    return table


def sweep_table(name: str, source, results) -> Table:
    """`vitpool sweep`: every point of a sweep.Results."""
    table = Table(title=f"{name} on {source}: {results.reference['n']} images, unpooled {results.reference['gmacs']:.3f} "
                        f"GMACs, top-1 {results.reference['top1']:.1f}%")
    table.box, table.show_edge = box.SIMPLE_HEAD, False  # narrow: K lists can be long
    for column in ("method", "budget", "schedule", "GMACs", "top-1", "agree", "KL"):  # top-5: results.csv
        table.add_column(column, justify="left" if column in ("method", "schedule") else "right", no_wrap=True)
    table.add_column("K after blocks", min_width=12, overflow="fold")
    for r in sorted(results.rows, key=lambda r: (r["method"], r["budget"], r["schedule"])):
        if "error" in r:
            table.add_row(r["method"], f"{r['budget']:g}", r["schedule"], "", "", "", "", "unreachable (see results.json)")
            continue
        table.add_row(r["method"], f"{r['budget']:g}", r["schedule"], f"{r['gmacs']:.3f}", f"{r['top1']:.1f}",
                      f"{r['agreement']:.1f}", f"{r['kl']:.3f}", k_after_layers(r["k"], r["layers"]))
    return table


def finetune_table(name: str, config, out_dir, history: list[dict]) -> Table:
    """`vitpool finetune`: one row per epoch of the run's history."""
    table = Table(title=f"fine-tuned {name}, {config.describe()} -> {out_dir}")
    for column in ("epoch", "train loss", "lr", "images/s", "val top-1", "val top-5", "agreement", "KL"):
        table.add_column(column, justify="right")
    for record in history:
        val = record.get("val") or {}
        cells = [f"{record['train_loss']:.4f}", f"{record['lr']:.1e}", f"{record['images_per_s']:.1f}"] if "train_loss" in record else ["", "", ""]
        cells += [f"{val[key]:.2f}" if val else "" for key in ("top1", "top5", "agreement")]
        cells.append(f"{val['kl']:.4f}" if val else "")
        table.add_row(str(record["epoch"]), *cells)
    return table
