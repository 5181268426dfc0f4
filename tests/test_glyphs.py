"""The embedded image suite ``glyphs:<target>``: rendering, splits, cache, domain shift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fontTools.ttLib import TTFont
from swr.tasks import glyphs as G
from swr.tasks.base import materialize

from swr.errors import SwrError

# "fine" is the smallest task (12 classes x 80 images, under a second to render).
SMALL = "fine"


def _render(target: str, n: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` training-style images of ``target`` as float (n, S, S, 3) in [0, 1]."""
    spec = G.SPECS[target]
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if spec.kind == "char":
            glyph, font = spec.classes[i % len(spec.classes)], spec.fonts[i % len(spec.fonts)]
        else:
            glyph, font = spec.glyphs[i % len(spec.glyphs)], spec.fonts[i % len(spec.fonts)]
        out.append(G.render_sample(glyph, font, spec.style, rng))
    return np.stack(out).astype(np.float32) / 255.0


def _luma(imgs: np.ndarray) -> np.ndarray:
    return imgs @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


@pytest.fixture(scope="module")
def small_task(tmp_path_factory) -> G.Task:
    return G.load_glyphs(SMALL, root=tmp_path_factory.mktemp("glyphs"), progress=False)


def test_render_sample_shape_and_determinism():
    a = G.render_sample("A", "DejaVuSans", "photo", np.random.default_rng(3))
    b = G.render_sample("A", "DejaVuSans", "photo", np.random.default_rng(3))
    c = G.render_sample("A", "DejaVuSans", "photo", np.random.default_rng(4))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    small = G.render_sample("g", "cmr10", "sketch", np.random.default_rng(0), image_size=16)
    assert small.shape == (16, 16, 3)


def test_render_sample_rejects_unknown_style_and_font():
    with pytest.raises(SwrError, match="photo"):
        G.render_sample("A", "DejaVuSans", "cubist", np.random.default_rng(0))
    with pytest.raises(SwrError, match="NoSuchFont"):
        G.render_sample("A", "NoSuchFont", "photo", np.random.default_rng(0))


def test_specs_cover_every_glyph_and_keep_shift_unseen():
    assert set(G.SPECS) == {G.SOURCE, *G.TARGETS} and len(G.TARGETS) >= 4
    for name, spec in G.SPECS.items():
        glyphs = spec.classes if spec.kind == "char" else spec.glyphs + spec.shift_glyphs
        fonts = spec.fonts + spec.shift_fonts
        for font in fonts:
            cmap = TTFont(G.font_path(font)).getBestCmap()
            missing = [g for g in glyphs if ord(g) not in cmap]
            assert not missing, f"{name}: {font} lacks {missing}"
        # shift_test must be out of distribution: unseen fonts, or unseen letters.
        if spec.kind == "char":
            assert not set(spec.fonts) & set(spec.shift_fonts), name
        else:
            assert not set(spec.glyphs) & set(spec.shift_glyphs), name
            assert len(set(spec.fonts)) == len(spec.classes), name


def test_task_shapes_dtypes_and_class_counts(small_task):
    spec = G.SPECS[SMALL]
    assert small_task.id == f"glyphs:{SMALL}" and small_task.modality == "image"
    assert small_task.class_names == list(spec.classes)
    assert small_task.input_shape == (3, 32, 32)
    for split, per_class in spec.per_class:
        x, y = materialize(getattr(small_task, split))
        assert x.shape == (per_class * len(spec.classes), 3, 32, 32), split
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.bincount(y, minlength=len(spec.classes)).tolist() == [per_class] * len(spec.classes)
        assert torch.isfinite(x).all()
    assert small_task.info["counts"] == {s: n * len(spec.classes) for s, n in spec.per_class}
    # Pixels in [0, 1] map onto [(0 - MEAN) / STD, (1 - MEAN) / STD].
    x, _ = materialize(small_task.train)
    assert x.min() >= (0 - max(G.MEAN)) / min(G.STD) - 1e-5
    assert x.max() <= (1 - min(G.MEAN)) / min(G.STD) + 1e-5
    assert torch.allclose(G.normalize((G.denormalize(x[:4]) * 255).round().to(torch.uint8)), x[:4],
                          atol=1e-5)


def test_train_transform_translates_without_changing_shape(small_task):
    x, _ = materialize(small_task.train)
    batch = x[:16]
    aug = small_task.train_transform
    assert isinstance(aug, G.RandomTranslate) and aug.max_shift == 2
    out = G.RandomTranslate(2, torch.Generator().manual_seed(0))(batch)
    again = G.RandomTranslate(2, torch.Generator().manual_seed(0))(batch)
    assert out.shape == batch.shape and torch.equal(out, again)
    assert not torch.equal(out, batch)
    # Every output image is its input shifted: the input's centre appears unchanged
    # at some offset within +-2 pixels.
    for o, b in zip(out, batch):
        centre = b[:, 4:28, 4:28]
        assert any(torch.equal(o[:, 4 + dy:28 + dy, 4 + dx:28 + dx], centre)
                   for dy in range(-2, 3) for dx in range(-2, 3))
    assert torch.equal(G.RandomTranslate(0)(batch), batch)


def test_same_seed_same_tensors_other_seed_differs(small_task, tmp_path):
    again = G.load_glyphs(SMALL, root=tmp_path / "a", progress=False)
    other = G.load_glyphs(SMALL, root=tmp_path / "b", seed=1, progress=False)
    for split in G.SPLITS:
        x0, y0 = materialize(getattr(small_task, split))
        x1, y1 = materialize(getattr(again, split))
        x2, _ = materialize(getattr(other, split))
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert not torch.equal(x0, x2)


def test_cache_is_reused(tmp_path, monkeypatch):
    first = G.load_glyphs(SMALL, root=tmp_path, progress=False)
    folder = Path(first.info["cache_dir"])
    assert folder.parent == tmp_path and (folder / "manifest.json").is_file()
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["version"] == G.GLYPHS_VERSION
    assert manifest["class_names"] == first.class_names
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json"] + [f"{s}.safetensors" for s in G.SPLITS])

    def no_rendering(*args, **kwargs):
        raise AssertionError("a valid cache was regenerated")

    monkeypatch.setattr(G, "_render_split", no_rendering)
    second = G.load_glyphs(SMALL, root=tmp_path, progress=False)
    assert torch.equal(materialize(second.test)[0], materialize(first.test)[0])


def test_cache_regenerates_on_config_change_or_damage(tmp_path, monkeypatch):
    first = G.load_glyphs(SMALL, root=tmp_path, progress=False)
    folder = Path(first.info["cache_dir"])
    old_hash = first.info["config_hash"]

    monkeypatch.setattr(G, "GLYPHS_VERSION", G.GLYPHS_VERSION + 1)
    bumped = G.load_glyphs(SMALL, root=tmp_path, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert bumped.info["config_hash"] != old_hash
    assert manifest["config_hash"] == bumped.info["config_hash"]
    assert manifest["config"]["version"] == G.GLYPHS_VERSION

    (folder / "val.safetensors").write_bytes(b"truncated")
    repaired = G.load_glyphs(SMALL, root=tmp_path, progress=False)
    assert torch.equal(materialize(repaired.val)[0], materialize(first.val)[0])
    # Nothing but the cache folder is left behind in the root.
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_interrupted_generation_leaves_no_half_cache(tmp_path, monkeypatch):
    good = G.load_glyphs(SMALL, root=tmp_path, progress=False)
    folder = Path(good.info["cache_dir"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    render = G._render_split

    def dies_on_test_split(spec, target, split, *args, **kwargs):
        if split == "test":
            raise KeyboardInterrupt
        return render(spec, target, split, *args, **kwargs)

    monkeypatch.setattr(G, "_render_split", dies_on_test_split)
    monkeypatch.setattr(G, "GLYPHS_VERSION", G.GLYPHS_VERSION + 1)
    with pytest.raises(KeyboardInterrupt):
        G.load_glyphs(SMALL, root=tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SWR_CACHE", str(tmp_path / "env"))
    assert G.cache_root() == tmp_path / "env" / "glyphs"
    assert G.cache_root(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("SWR_CACHE")
    assert G.cache_root() == Path.home() / ".cache" / "swr" / "glyphs"


def test_bad_arguments_raise_swr_error(tmp_path):
    with pytest.raises(SwrError) as err:
        G.load_glyphs("klingon", root=tmp_path)
    assert "klingon" in str(err.value)
    assert all(name in str(err.value) for name in (G.SOURCE, *G.TARGETS))
    with pytest.raises(SwrError, match="image_size"):
        G.load_glyphs(SMALL, root=tmp_path, image_size=4)
    assert not any(tmp_path.iterdir())


def test_domains_differ_from_the_source():
    source, sketch = _render(G.SOURCE), _render("sketch")
    painting, fine = _render("painting"), _render("fine")

    def chroma(imgs: np.ndarray) -> float:
        return float((imgs.max(-1) - imgs.min(-1)).mean())

    def edge_density(imgs: np.ndarray) -> float:
        luma = _luma(imgs)
        return float((np.abs(np.diff(luma, axis=2)) > 0.15).mean())

    def top_colour_mass(imgs: np.ndarray) -> float:
        """Share of pixels in each image's 8 most frequent (coarsened) colours."""
        shares = []
        for img in imgs:
            _, counts = np.unique((img * 255).astype(np.uint8).reshape(-1, 3) // 8, axis=0,
                                  return_counts=True)
            shares.append(np.sort(counts)[::-1][:8].sum() / counts.sum())
        return float(np.mean(shares))

    # Sketch: bright, grey paper with dense thin strokes; source: colourful, mid-grey.
    assert _luma(sketch).mean() > 0.7 and _luma(source).mean() < 0.6
    assert chroma(sketch) < 0.1 and chroma(source) > 0.25
    assert edge_density(sketch) > 1.5 * edge_density(source)
    # Painting: posterised, so few colours cover much of each image.
    assert top_colour_mass(painting) > 3 * top_colour_mass(source)
    # Print (fine): ink on paper, bright and nearly colourless.
    assert _luma(fine).mean() > 0.7 and chroma(fine) < 0.2
    # Same-style targets (greek, cyrillic) share the source's statistics.
    greek = _render("greek")
    assert abs(_luma(greek).mean() - _luma(source).mean()) < 0.05


def test_images_spec_renders_other_split_sizes_in_their_own_cache(tmp_path, small_task):
    """``glyphs:<target>?images=T,V,E`` renders those counts per class in a folder of its
    own, keeps the modifier in the id, and starts each split with the default images."""
    from swr.tasks import get_task

    task = get_task(f"glyphs:{SMALL}?images=2,12,3", root=tmp_path, progress=False)
    n = len(G.SPECS[SMALL].classes)
    assert task.id == f"glyphs:{SMALL}?images=2,12,3"
    assert task.info["counts"] == {"train": 2 * n, "val": 12 * n, "test": 3 * n,
                                   "shift_test": 3 * n}
    assert [p.name for p in tmp_path.iterdir()] == [f"{SMALL}-seed0-32px-images-2-12-3-3"]
    default = dict(G.SPECS[SMALL].per_class)
    for split in ("train", "test"):  # smaller or larger than the default: the same prefix
        mine, theirs = getattr(task, split).tensors, getattr(small_task, split).tensors
        k = min(len(mine[1]), default[split] * n)
        assert torch.equal(mine[0][:k], theirs[0][:k]) and torch.equal(mine[1][:k], theirs[1][:k])
    for bad in ("?images=2,1", "?images=2,0,1", "?count=2,1,1"):
        with pytest.raises(SwrError, match=r"images per class .* e\.g\. glyphs:fine\?images="):
            get_task(f"glyphs:{SMALL}{bad}", root=tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
