"""Image-folder tasks (ImageNet-to-Sketch layout): ``<path>/{train,test}/<class>/<images>``.

The benchmark ships no validation split, so one is carved from train, stratified per
class and seeded. Images are decoded lazily; the per-image train augmentation
(random resized crop, flip) runs in ``__getitem__`` because images of different
sizes cannot be batched before they are resized, so ``Task.train_transform`` stays
``None``.

Every image file (of every loader, and of ``swr.store``'s predictions) is read through
:func:`read_image`, the way image viewers show it: EXIF orientation applied, 16-bit grey
scaled by its bit depth, transparency composited on white; an image of more than
:data:`MAX_IMAGE_PIXELS` is refused in one line before it is decoded.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from swr.errors import SwrError

from .base import Task, not_a_regular_file
from .datasets import (FileDataset, Item, OnBadFile, check_fraction, check_no_class_lost,
                       check_on_bad_file, class_counts, probe_items, stratified_holdout)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # resize to S/0.875 then center-crop S: the usual ImageNet eval
#: The most pixels an image read here may have (8192 x 8192, 64 Mpx: 192 MiB as RGB).
#: Above it an image is refused before its pixels are decoded: a 41 KB PNG can claim
#: 12000 x 12000. Set as PIL's own cap too, so PIL refuses at open what is above it.
MAX_IMAGE_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# PIL modes of one integer channel wider than 8 bits, and their bit depth ("I": 16-bit
# PNG and PGM data as older Pillow opens them; values above 16 bits are clipped)
_DEEP_GREY_BITS = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 16}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImageFile(SwrError):
    """An image that cannot be decoded; carries its path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        super().__init__(
            f"cannot read image file {path}: {reason}; "
            f"fix or delete it, or pass --on-bad-file skip")


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _check_regular(path: Path) -> None:
    reason = not_a_regular_file(path)
    if reason is not None:  # never opened: a FIFO would block forever
        raise BadImageFile(path, reason)


def _too_large(pixels: int | None) -> str:
    size = f"{pixels:,} pixels" if pixels is not None else "more pixels"
    return (f"it has {size}, over the {MAX_IMAGE_PIXELS:,} an image read here may have "
            f"(a decompression bomb, or a picture to downscale)")


def open_image(path: Path) -> Image.Image:
    """``path`` opened by PIL (header read, pixels not decoded), within the pixel cap.

    Raises :class:`BadImageFile` naming the file for a path that is not a regular file
    (never opened: a FIFO named ``x.png`` would block), a file PIL cannot identify, and
    an image of more than :data:`MAX_IMAGE_PIXELS` pixels: one line, where PIL would
    warn (``DecompressionBombWarning``) and decode it anyway. The caller closes it.
    """
    _check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise BadImageFile(path, _too_large(int(found.group(1)) if found else None)) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise BadImageFile(path, _reason(e)) from None
    if im.width * im.height > MAX_IMAGE_PIXELS:  # PIL's cap may have been changed since
        im.close()
        raise BadImageFile(path, _too_large(im.width * im.height))
    return im


def probe_image(path: Path) -> None:
    """Raise :class:`BadImageFile` unless :func:`open_image` opens ``path`` and its structure
    verifies.

    ``verify()`` checks headers (and chunk CRCs for PNG) without decoding pixels; a
    truncated JPEG can pass it and is caught by :func:`read_image` on access.
    """
    with open_image(path) as im:
        try:
            im.verify()
        except Exception as e:
            raise BadImageFile(path, _reason(e)) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB, as image viewers and torchvision show it.

    Integer grey deeper than 8 bits (16-bit PNG, mode ``I;16``) is scaled by its bit
    depth (65535 -> 255), not clipped; an image with transparency (an alpha channel,
    or a palette or colour marked transparent) is composited on white, so a drawing
    made in the alpha channel alone shows; palette, CMYK and the rest are converted.
    """
    bits = _DEEP_GREY_BITS.get(im.mode)
    if bits is not None:
        top = (1 << bits) - 1
        deep = np.clip(np.asarray(im, dtype=np.int64), 0, top)
        im = Image.fromarray(((deep * 255 + top // 2) // top).astype(np.uint8))  # mode L
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_image(path: Path) -> Image.Image:
    """Decode ``path`` to an RGB PIL image: the one reader of every image file.

    Opened within the pixel cap (:func:`open_image`), turned upright by its EXIF
    orientation (``ImageOps.exif_transpose``), then converted by :func:`to_rgb`.
    Raises :class:`BadImageFile` naming the file when it cannot be read.
    """
    with open_image(path) as im:
        try:
            return to_rgb(ImageOps.exif_transpose(im))
        except Exception as e:
            raise BadImageFile(path, _reason(e)) from None


#: Training augmentations an image task may declare: ``none``; ``light`` (shifts of up
#: to 1/16 of the size, edges repeated, no flip: digits, glyphs, text, where a flip or a
#: tight crop changes the class); ``timm`` (RandomResizedCrop + horizontal flip, the
#: usual recipe for natural photographs).
AUGMENTATIONS = ("none", "light", "timm")

#: Largest image size for which :func:`default_augment` picks ``light``.
SMALL_IMAGE = 64


def default_augment(image_size: int) -> str:
    """The augmentation an image task gets when none is declared: ``light`` for small
    images (digits, icons, glyphs: at most :data:`SMALL_IMAGE` px), ``timm`` otherwise."""
    return "light" if image_size <= SMALL_IMAGE else "timm"


def image_transforms(image_size: int, cropped: bool = False, mean: tuple = IMAGENET_MEAN,
                     std: tuple = IMAGENET_STD, interpolation: str = "bilinear",
                     crop_pct: float = EVAL_CROP_RATIO, augment: str = "timm"
                     ) -> tuple[Callable[[Image.Image], torch.Tensor],
                                Callable[[Image.Image], torch.Tensor]]:
    """``(train, eval)`` transforms from a PIL image to a normalised ``(3, S, S)`` float tensor.

    Eval: Resize(S/crop_pct) + CenterCrop(S). Train: as eval, then ``augment`` (see
    :data:`AUGMENTATIONS`; ``timm`` replaces the resize and crop by RandomResizedCrop).
    ``cropped`` (CUB/Cars cropped to the object): a plain Resize((S, S)) for both, the
    train side keeping the flip under ``timm``. Both normalise with ``mean``/``std``
    (ImageNet's by default; a backbone's own data config supplies its values, see
    :func:`data_config_kwargs`).
    """
    if augment not in AUGMENTATIONS:
        raise SwrError(f"image augmentation {augment!r} is not one of {', '.join(AUGMENTATIONS)}")
    mode = v2.InterpolationMode(interpolation)
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor()]
    if cropped:
        evaluate = [v2.ToImage(), v2.Resize((image_size, image_size), interpolation=mode)]
    else:
        evaluate = [v2.ToImage(), v2.Resize(int(image_size / crop_pct), interpolation=mode),
                    v2.CenterCrop(image_size)]
    if augment == "none":
        train = list(evaluate)
    elif augment == "light":
        train = [*evaluate, v2.RandomCrop(image_size, padding=max(1, image_size // 16),
                                          padding_mode="edge")]
    elif cropped:
        train = [*evaluate, v2.RandomHorizontalFlip()]
    else:
        train = [v2.ToImage(), v2.RandomResizedCrop(image_size, interpolation=mode),
                 v2.RandomHorizontalFlip()]
    return v2.Compose(train + tail), v2.Compose(evaluate + tail)


def data_config_kwargs(data_config: Optional[dict]) -> dict:
    """:func:`image_transforms` keywords from a timm data config (``resolve_data_config``).

    Empty for None: the defaults (ImageNet mean/std, bilinear, crop 0.875) then apply.
    Images are square: the size is the config's last input dimension.
    """
    if not data_config:
        return {}
    out: dict = {}
    if data_config.get("input_size"):
        out["image_size"] = int(data_config["input_size"][-1])
    for key in ("mean", "std"):
        if data_config.get(key):
            out[key] = tuple(float(v) for v in data_config[key])
    if data_config.get("interpolation") in ("nearest", "bilinear", "bicubic"):
        out["interpolation"] = data_config["interpolation"]
    if data_config.get("crop_pct"):
        out["crop_pct"] = float(data_config["crop_pct"])
    return out


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden entries skipped), sorted.

    A symlinked subfolder is followed only when it leads to a folder inside
    ``folder`` that is not walked already: a link such as ``loop -> ..`` would
    otherwise walk the class folder again and again, and bring other classes' (or
    splits') images into this class. ``folder`` itself may be a link.
    """
    top = os.path.realpath(folder)
    walked = {top}
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):  # sorted: which of two paths to one folder is kept
            if d.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in walked or os.path.commonpath([top, real]) != top:
                continue
            walked.add(real)
            keep.append(d)
        dirnames[:] = keep
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def _list_split(root: Path, split: str) -> dict[str, list[Path]]:
    """``{class name: image paths}`` for ``root/split``; every class folder must hold images."""
    folder = root / split
    if not folder.is_dir():
        raise SwrError(f"image folder dataset {root} has no {split}/ folder ({folder}); "
                       f"expected {root}/{{train,test}}/<class>/<images>")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SwrError(f"{folder} holds no class folders; expected {folder}/<class>/<images>")
    listing = {}
    for name in classes:
        files = _images_under(folder / name)
        if not files:
            raise SwrError(f"class folder {folder / name} holds no images "
                           f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        listing[name] = files
    return listing


def load_imagefolder(path: str | os.PathLike, image_size: int = 224, val_fraction: float = 0.1,
                     seed: int = 0, cropped: bool = False, on_bad_file: OnBadFile = "fail",
                     data_config: Optional[dict] = None, augment: Optional[str] = None) -> Task:
    """An image classification task from ``<path>/{train,test}/<class>/<images>``.

    Class names are the sorted folder names of ``train/``; ``test/`` must hold the
    same classes. Images (jpg, jpeg, png, bmp, webp, any case) are found recursively
    in each class folder. ``val_fraction`` of each class's train images (at least one,
    never a class's last) is held out as the validation split, keyed by ``seed``; it
    uses the eval transform. Every file's header is checked at load; an unreadable
    image raises :class:`SwrError` naming it, or with ``on_bad_file="skip"`` is dropped
    and listed in ``task.info["skipped"]`` (files that fail only on full decode are
    found on access and added there); a class left without a readable train image is an
    error. See :func:`image_transforms` for the transforms;
    ``data_config`` (a backbone's timm data config, or the one a ``swr pretrain``
    checkpoint records) sets their size, mean, std, interpolation and crop pct in place
    of ``image_size`` and the ImageNet defaults. ``augment`` (:data:`AUGMENTATIONS`;
    default :func:`default_augment` of the size) is the training augmentation, recorded
    in ``task.info["augment"]``.
    """
    root = Path(path)
    tf_kwargs = {"image_size": image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                 "interpolation": "bilinear", "crop_pct": EVAL_CROP_RATIO,
                 **data_config_kwargs(data_config)}
    image_size = tf_kwargs["image_size"]
    policy = check_on_bad_file(on_bad_file)
    check_fraction("val_fraction", val_fraction, low_open=True)
    if image_size < 1:
        raise SwrError(f"image_size must be a positive number of pixels, got {image_size}")
    if not root.is_dir():
        raise SwrError(f"image folder dataset not found: {root}")

    train_listing = _list_split(root, "train")
    class_names = list(train_listing)
    if len(class_names) < 2:
        raise SwrError(f"{root / 'train'} holds a single class ({class_names[0]}); "
                       f"a classification task needs at least two class folders")
    test_listing = _list_split(root, "test")
    for name in test_listing:
        if name not in train_listing:
            raise SwrError(f"class {name!r} in {root / 'test'} has no folder in {root / 'train'}; "
                           f"train and test must hold the same classes")
    for name in class_names:
        if name not in test_listing:
            raise SwrError(f"class {name!r} in {root / 'train'} has no folder in {root / 'test'}; "
                           f"train and test must hold the same classes")

    def items(listing: dict[str, list[Path]]) -> list[Item]:
        return [(p, label) for label, name in enumerate(class_names) for p in listing[name]]

    # Split before probing so a skipped file never moves another into or out of val.
    train_items, val_items = stratified_holdout(items(train_listing), val_fraction, seed)
    if not val_items:
        raise SwrError(f"{root / 'train'} has too few images to hold out a validation split "
                       f"(every class has a single image); add images")
    skipped: list[str] = []
    probed = probe_items(train_items, probe_image, policy, skipped)
    check_no_class_lost(train_items, probed, class_names, "train", root / "train")
    train_items = probed
    val_items = probe_items(val_items, probe_image, policy, skipped)
    test_items = probe_items(items(test_listing), probe_image, policy, skipped)
    for split, split_items in (("train", train_items), ("validation", val_items),
                               ("test", test_items)):
        if not split_items:
            raise SwrError(f"no readable images left in the {split} split of {root}")

    augment = augment or default_augment(image_size)
    train_tf, eval_tf = image_transforms(cropped=cropped, augment=augment, **tf_kwargs)
    splits = {
        "train": FileDataset(train_items, read_image, train_tf, policy, skipped),
        "val": FileDataset(val_items, read_image, eval_tf, policy, skipped),
        "test": FileDataset(test_items, read_image, eval_tf, policy, skipped),
    }
    return Task(
        id=f"imagefolder:{path}", modality="image", class_names=class_names,
        input_shape=(3, image_size, image_size), **splits,
        info={"root": str(root), "skipped": skipped, "val_fraction": val_fraction, "seed": seed,
              "cropped": cropped, "image_size": image_size, "augment": augment,
              "preprocess": {**tf_kwargs, "mean": list(tf_kwargs["mean"]),
                             "std": list(tf_kwargs["std"]),
                             "crop_pct": None if cropped else tf_kwargs["crop_pct"]},
              "class_counts": {k: class_counts(ds.labels, class_names)
                               for k, ds in splits.items()}},
    )
