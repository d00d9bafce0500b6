"""Cluster pictures like the paper's Fig. 1c: each patch of the image coloured by the token it ends up in.

Every pooling layer returns, for each of its input tokens, the output token representing it (`assign`,
-1 where selection dropped the token); composing the assignments from the first layer on gives, for every
original 16x16 patch, its token after each layer. That covers every method, ToMe's merges included.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

from vitpool.errors import VitpoolError

DROPPED = -1
BORDER = (255, 255, 255)
TITLE_HEIGHT = 22
MARGIN = 8


def patch_tokens(model, image) -> dict[int, object]:
    """Block index -> [N0] the token (after that block's pooling layer) each original patch ends up in, -1 if dropped."""
    import torch

    from vitpool.adapter import pooled_layers

    layers = pooled_layers(model)
    if not layers:
        raise VitpoolError("the model has no pooling layers to show; pass a converted model, --k or --budget")
    assignments: dict[int, torch.Tensor] = {}
    handles = [pool.register_forward_hook(lambda _m, _i, output, layer=layer: assignments.__setitem__(layer, output[2][0]))
               for layer, pool in layers.items()]
    try:
        model.eval()
        with torch.inference_mode():
            model(image.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    current = torch.arange(model.patch_embed.num_patches)
    maps = {}
    for layer in sorted(assignments):
        step = assignments[layer]
        current = torch.where(current >= 0, step[current.clamp_min(0)], torch.full_like(current, DROPPED))
        maps[layer] = current.clone()
    return maps


def colour(token: int) -> tuple[int, int, int]:
    """A distinct, deterministic colour per token: hues spaced by the golden ratio, two lightness levels."""
    hue = (token * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.5 if token % 2 == 0 else 0.62, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def render_panel(picture, tokens, grid: tuple[int, int], alpha: float = 0.5):
    """`picture` (PIL RGB) with each patch blended with its token's colour, dropped patches darkened, and
    a line along every patch edge that separates two tokens."""
    from PIL import Image, ImageDraw

    rows, cols = grid
    width, height = picture.size
    cell_w, cell_h = width / cols, height / rows
    overlay = Image.new("RGB", picture.size)
    draw = ImageDraw.Draw(overlay)
    labels = tokens.reshape(rows, cols).tolist()
    box = lambda r, c: (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w) - 1, round((r + 1) * cell_h) - 1)  # noqa: E731
    for r in range(rows):
        for c in range(cols):
            draw.rectangle(box(r, c), fill=(0, 0, 0) if labels[r][c] == DROPPED else colour(labels[r][c]))
    panel = Image.blend(picture, overlay, alpha)
    lines = ImageDraw.Draw(panel)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = round(c * cell_w), round(r * cell_h)
            if c + 1 < cols and labels[r][c] != labels[r][c + 1]:
                x = round((c + 1) * cell_w)
                lines.line([(x, y0), (x, round((r + 1) * cell_h))], fill=BORDER, width=1)
            if r + 1 < rows and labels[r][c] != labels[r + 1][c]:
                y = round((r + 1) * cell_h)
                lines.line([(x0, y), (round((c + 1) * cell_w), y)], fill=BORDER, width=1)
    return panel


def input_picture(tensor, config: dict, scale: int):
    """The preprocessed input tensor back as a picture (what the model sees: resized and cropped)."""
    import torch
    from PIL import Image

    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    pixels = ((tensor * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def read_image(path: Path, model, preprocess=None):
    """The image as the model sees it (timm's evaluation transform, `preprocess` a data.Preprocess), and the config."""
    from PIL import Image

    from vitpool.data import Preprocess, transform_for

    transform, config = transform_for(model, preprocess or Preprocess())
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise VitpoolError(f"image {path} {what}: give one image file (JPEG, PNG, ...)")
    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB")), config
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise VitpoolError(f"cannot read image {path}: {' '.join(str(error).split())[:120]}") from None


def visualize(model, image_path: Path, out: Path, layers: list[int] | None = None, scale: int = 2, preprocess=None) -> dict:
    """Write the original image and one panel per chosen pooling layer side by side to `out` (PNG, atomically)."""
    from PIL import Image, ImageDraw

    from vitpool.adapter import token_grid
    from vitpool.outputs import write_atomically

    tensor, config = read_image(image_path, model, preprocess)
    maps = patch_tokens(model, tensor)
    chosen = sorted(maps) if not layers else layers
    missing = [layer for layer in chosen if layer not in maps]
    if missing:
        raise VitpoolError(f"--layers {','.join(map(str, missing))}: the model pools after blocks "
                           f"{','.join(map(str, sorted(maps)))} only")
    picture = input_picture(tensor, config, scale)
    grid = token_grid(model)
    panels = [("input", picture)]
    for layer in chosen:
        tokens = maps[layer]
        kept = int(tokens[tokens >= 0].unique().numel())
        dropped = int((tokens < 0).sum())
        title = f"after block {layer}: {kept} tokens" + (f", {dropped} patches dropped" if dropped else "")
        panels.append((title, render_panel(picture, tokens, grid)))
    width = len(panels) * (picture.width + MARGIN) + MARGIN
    canvas = Image.new("RGB", (width, picture.height + TITLE_HEIGHT + MARGIN), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (title, panel) in enumerate(panels):
        x = MARGIN + i * (picture.width + MARGIN)
        draw.text((x, 5), title, fill=(0, 0, 0))
        canvas.paste(panel, (x, TITLE_HEIGHT))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_atomically(Path(out), buffer.getvalue())
    return {"out": str(out), "size": list(canvas.size), "layers": chosen,
            "tokens": {layer: int(maps[layer][maps[layer] >= 0].unique().numel()) for layer in chosen}}
