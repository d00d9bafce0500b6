"""`vitpool visualize`: patches followed through successive pooling layers, every patch coloured."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vitpool
from vitpool.adapter import pooled_layers
from vitpool.errors import VitpoolError
from vitpool.visualize import DROPPED, MARGIN, TITLE_HEIGHT, colour, patch_tokens, read_image, visualize


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A smooth colour gradient (structure for the clusters to follow), 300 x 260 pixels."""
    x = torch.linspace(0, 1, 300).view(1, -1).expand(260, -1)
    y = torch.linspace(0, 1, 260).view(-1, 1).expand(-1, 300)
    pixels = (torch.stack([x, y, (x + y) / 2], dim=-1) * 255).to(torch.uint8).numpy()
    path = tmp_path_factory.mktemp("photo") / "gradient.png"
    Image.fromarray(pixels).save(path)
    return path


def assignments(model, image):
    seen = {}
    handles = [pool.register_forward_hook(lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out[2][0]))
               for layer, pool in pooled_layers(model).items()]
    with torch.inference_mode():
        model(image.unsqueeze(0))
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("method", ["wkmedoids", "tome", "importance", "grid"])
def test_patches_follow_the_assignments_through_the_layers(tiny_model, photo, method):
    model = vitpool.convert(tiny_model, method=method, k=[120, 64], layers=[2, 6], iters=2)
    image, _ = read_image(photo, model)
    maps = patch_tokens(model, image)
    steps = assignments(model, image)
    assert sorted(maps) == [2, 6]
    first, second = maps[2], maps[6]
    assert first.shape == (196,) and second.shape == (196,)
    assert torch.equal(first, steps[2])
    expected = torch.where(first >= 0, steps[6][first.clamp_min(0)], torch.full_like(first, DROPPED))
    assert torch.equal(second, expected)
    assert int(first.max()) < 120 and int(second.max()) < 64
    if method == "importance":  # selection keeps exactly K patches and drops the rest
        assert int((first >= 0).sum()) == 120 and int((second >= 0).sum()) == 64
    else:  # merging methods: every patch is represented by some token
        assert bool((second >= 0).all())


def test_every_patch_is_coloured_and_the_png_has_the_expected_size(tiny_model, photo, tmp_path):
    model = vitpool.convert(tiny_model, method="tome", k=[120, 64], layers=[2, 6])
    out = tmp_path / "clusters.png"
    summary = visualize(model, photo, out, scale=2)
    side = 224 * 2
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == (3 * (side + MARGIN) + MARGIN, side + TITLE_HEIGHT + MARGIN) == tuple(summary["size"])
        canvas = png.convert("RGB")
    panel = lambda i: canvas.crop((MARGIN + i * (side + MARGIN), TITLE_HEIGHT, MARGIN + i * (side + MARGIN) + side, TITLE_HEIGHT + side))  # noqa: E731
    original = panel(0)
    image, _ = read_image(photo, model)
    maps = patch_tokens(model, image)
    for i, layer in enumerate([2, 6], start=1):
        drawn = panel(i)
        for p in range(196):
            r, c = divmod(p, 14)
            centre = (c * 32 + 16, r * 32 + 16)
            token = int(maps[layer][p])
            expected = tuple((a + b) / 2 for a, b in zip(original.getpixel(centre), colour(token)))
            assert drawn.getpixel(centre) != original.getpixel(centre), f"patch {p} not coloured after block {layer}"
            assert all(abs(a - b) <= 1 for a, b in zip(drawn.getpixel(centre), expected)), f"patch {p}: wrong colour"
    assert summary["tokens"] == {2: int(maps[2].unique().numel()), 6: int(maps[6].unique().numel())}


def test_layer_selection_and_bad_inputs(tiny_model, photo, tmp_path):
    model = vitpool.convert(tiny_model, k=[120, 64], layers=[2, 6], iters=1)
    summary = visualize(model, photo, tmp_path / "one.png", layers=[6], scale=1)
    assert summary["layers"] == [6] and summary["size"] == [2 * (224 + MARGIN) + MARGIN, 224 + TITLE_HEIGHT + MARGIN]
    with pytest.raises(VitpoolError, match="pools after blocks 2,6 only"):
        visualize(model, photo, tmp_path / "bad.png", layers=[3])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(VitpoolError, match="cannot read image"):
        visualize(model, not_an_image, tmp_path / "x.png")
    with pytest.raises(VitpoolError, match="no pooling layers"):
        visualize(tiny_model, photo, tmp_path / "y.png")
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "x.png").exists()
