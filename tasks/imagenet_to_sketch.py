"""The five target datasets of the ImageNet-to-Sketch benchmark, read as distributed.

The benchmark (Mallya et al., Piggyback, 2018; used by TAPS and by the SWR paper)
moves an ImageNet model to CUB-200-2011, Stanford Cars, Oxford Flowers-102, WikiArt
and Sketch (the TU-Berlin sketches of Eitz et al., 2012: 250 classes, 80 drawings
each; not ImageNet-Sketch). Each loader takes the dataset's own archive layout and
also the plain ``{train,test}/<class>/`` re-packaging (Piggyback's ``CUBS_Cropped``
and friends):

* ``cub:<path>``: ``images.txt``, ``train_test_split.txt``, ``image_class_labels.txt``,
  ``classes.txt`` and ``images/``; crops to ``bounding_boxes.txt`` when present (as
  Piggyback's cropped CUBS).
* ``stanford-cars:<path>``: ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat``,
  ``cars_test_annos_withlabels.mat`` (in the folder or ``devkit/``), ``cars_train/``,
  ``cars_test/``; or the single-file release ``cars_annos.mat`` + ``car_ims/``; images
  are cropped to their annotated boxes.
* ``flowers102:<path>``: ``imagelabels.mat``, ``setid.mat`` and ``jpg/``; the official
  train / val / test ids (10 / 10 / the rest per class); or ``{train,valid,test}/<class>/``.
* ``wikiart:<path>`` and ``sketch:<path>``: ``{train,test}/<class>/`` or one folder of
  class folders (TU-Berlin ships ``png/<class>/``), split 80/20 per class by a fixed
  draw, the same for every run seed.

Annotations in ``.mat`` files are read by :mod:`.matfile` (no SciPy needed). Where a
split has no validation part, one is held out of train per class, keyed by the seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from swr.errors import SwrError

from .base import Task
from .datasets import (FileDataset, Item, OnBadFile, check_fraction, check_no_class_lost,
                       check_on_bad_file, class_counts, probe_items, resolve_inside,
                       stratified_holdout)
from .imagefolder import (EVAL_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, _list_split,
                          data_config_kwargs, image_transforms, probe_image, read_image)
from .matfile import read_mat

#: the fixed draw that splits a dataset shipped without a test split (WikiArt, Sketch
#: as one folder): independent of the run seed, so every run scores the same test set
TEST_SPLIT_SEED = 0
TEST_FRACTION = 0.2

Box = tuple[float, float, float, float]  # left, upper, right, lower (PIL crop order)


class CroppedReader:
    """Decode an image and crop it to its annotated box (a picklable ``decode``)."""

    def __init__(self, boxes: dict[Path, Box]):
        self.boxes = boxes

    def __call__(self, path: Path) -> Image.Image:
        image = read_image(path)
        box = self.boxes.get(path)
        if box is None:
            return image
        left, upper, right, lower = box
        w, h = image.size
        left, upper = max(0, int(left)), max(0, int(upper))
        right, lower = min(w, int(round(right))), min(h, int(round(lower)))
        if right <= left or lower <= upper:  # a box outside the picture: keep it whole
            return image
        return image.crop((left, upper, right, lower))


def image_task(task_id: str, root: Path, class_names: Sequence[str], train: list[Item],
               test: list[Item], val: list[Item] | None = None, *,
               boxes: dict[Path, Box] | None = None, image_size: int = 224,
               val_fraction: float = 0.1, seed: int = 0, on_bad_file: OnBadFile = "fail",
               cropped: bool | None = None, info: dict | None = None,
               data_config: dict | None = None) -> Task:
    """An image task from labelled file lists, as :func:`~.imagefolder.load_imagefolder` builds.

    ``val`` None: ``val_fraction`` of each class of ``train`` is held out (keyed by
    ``seed``). ``boxes`` crop images to objects; cropped images use the square
    resize transforms (``cropped``, default: whether there are boxes). Every file's
    header is checked; bad files fail or are skipped (``task.info["skipped"]``).
    ``data_config`` (the base's timm data config) sets size, mean, std, interpolation
    and crop pct in place of ``image_size`` and the ImageNet defaults.
    """
    tf_kwargs = {"image_size": image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                 "interpolation": "bilinear", "crop_pct": EVAL_CROP_RATIO,
                 **data_config_kwargs(data_config)}
    image_size = tf_kwargs["image_size"]
    policy = check_on_bad_file(on_bad_file)
    check_fraction("val_fraction", val_fraction, low_open=True)
    if image_size < 1:
        raise SwrError(f"image_size must be a positive number of pixels, got {image_size}")
    if len(class_names) < 2:
        raise SwrError(f"{root} holds fewer than two classes; a classification task needs two")
    if val is None:
        train, val = stratified_holdout(train, val_fraction, seed)
        if not val:
            raise SwrError(f"{root}: too few training images to hold out a validation split "
                           f"(every class has a single one); add images")
    skipped: list[str] = []
    lists = {}
    for split, items in (("train", train), ("val", val), ("test", test)):
        lists[split] = probe_items(items, probe_image, policy, skipped)
        if split == "train":
            check_no_class_lost(items, lists[split], class_names, split, root)
        if not lists[split]:
            raise SwrError(f"no readable images in the {split} split of {root}")
    crop = bool(boxes) if cropped is None else cropped
    train_tf, eval_tf = image_transforms(cropped=crop, **tf_kwargs)
    decode = CroppedReader(boxes) if boxes else read_image
    splits = {s: FileDataset(lists[s], decode, train_tf if s == "train" else eval_tf, policy,
                             skipped) for s in lists}
    return Task(id=task_id, modality="image", class_names=list(class_names),
                input_shape=(3, image_size, image_size), **splits,
                info={"root": str(root), "skipped": skipped, "seed": seed,
                      "image_size": image_size, "cropped": crop, **(info or {}),
                      "preprocess": {**tf_kwargs, "mean": list(tf_kwargs["mean"]),
                                     "std": list(tf_kwargs["std"]),
                                     "crop_pct": None if crop else tf_kwargs["crop_pct"]},
                      "class_counts": {s: class_counts(ds.labels, class_names)
                                       for s, ds in splits.items()}})


# -- folder layouts ------------------------------------------------------------------------
def _folder_items(listing: dict[str, list[Path]], class_names: list[str]) -> list[Item]:
    return [(p, class_names.index(name)) for name in listing for p in listing[name]]


def _same_classes(root: Path, names: list[str], other: dict[str, list[Path]], split: str) -> None:
    if sorted(other) != names:
        extra = sorted(set(other) ^ set(names))
        raise SwrError(f"{root}: {split}/ and train/ hold different classes (e.g. {extra[0]!r}); "
                       f"every split must hold the same class folders")


def _split_folders(root: Path) -> dict[str, str] | None:
    """``{split: folder name}`` when ``root`` holds ``train/`` and ``test/`` (+ ``val``)."""
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return None
    found = {"train": "train", "test": "test"}
    for name in ("val", "valid", "validation"):
        if (root / name).is_dir():
            found["val"] = name
            break
    return found


def folder_task(kind: str, root: str | os.PathLike, *, cropped: bool = False,
                test_fraction: float = TEST_FRACTION, **kw) -> Task:
    """``root/{train,[val|valid],test}/<class>/`` or ``root/<class>/`` (split per class)."""
    root = Path(root)
    if not root.is_dir():
        raise SwrError(f"{kind} dataset folder not found: {root}")
    folders = _split_folders(root)
    if folders is not None:
        listing = {s: _list_split(root, name) for s, name in folders.items()}
        names = list(listing["train"])
        for s in listing:
            _same_classes(root, names, listing[s], folders[s])
        items = {s: _folder_items(v, names) for s, v in listing.items()}
        protocol = "train/ and test/ folders" + (f", val from {folders['val']}/"
                                                 if "val" in folders else "")
    else:
        listing = _list_split(root.parent, root.name)
        names = list(listing)
        check_fraction("test_fraction", test_fraction, low_open=True)
        train, test = stratified_holdout(_folder_items(listing, names), test_fraction,
                                         TEST_SPLIT_SEED)
        items = {"train": train, "test": test}
        protocol = f"one folder of class folders, {test_fraction:g} of each class as test"
    return image_task(f"{kind}:{root}", root, names, items["train"], items["test"],
                      items.get("val"), cropped=cropped, info={"protocol": protocol}, **kw)


# -- CUB-200-2011 ----------------------------------------------------------------------------
def _table(path: Path, columns: int) -> dict[str, list[str]]:
    """``{id: [fields]}`` from a whitespace-separated ``id field ...`` text file."""
    if not path.is_file():
        raise SwrError(f"{path} not found; restore it from the dataset's archive")
    rows: dict[str, list[str]] = {}
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != columns + 1:
                raise SwrError(f"{path}:{n}: expected {columns + 1} fields, found {len(parts)}; "
                               f"restore the file from the dataset's archive")
            rows[parts[0]] = parts[1:]
    return rows


def load_cub(path: str | os.PathLike, crop_to_box: bool = True, **kw) -> Task:
    """CUB-200-2011 (200 bird species; the official 5,994 / 5,794 train/test split)."""
    root = Path(path)
    if not (root / "images.txt").is_file():
        if _split_folders(root) is not None:
            return folder_task("cub", root, cropped="crop" in root.name.lower(), **kw)
        raise SwrError(f"CUB-200-2011 not found in {root}: expected images.txt, "
                       f"train_test_split.txt, image_class_labels.txt and images/ (the folder "
                       f"CUB_200_2011.tgz extracts to) or train/ and test/ class folders")
    images = _table(root / "images.txt", 1)
    is_train = _table(root / "train_test_split.txt", 1)
    labels = _table(root / "image_class_labels.txt", 1)
    classes = _table(root / "classes.txt", 1) if (root / "classes.txt").is_file() else None
    boxes_file = root / "bounding_boxes.txt"
    raw_boxes = _table(boxes_file, 4) if crop_to_box and boxes_file.is_file() else {}
    class_ids = sorted({int(v[0]) for v in labels.values()})
    if classes is not None:
        names = [classes[str(i)][0] if str(i) in classes else str(i) for i in class_ids]
    else:  # the class is the image's folder, e.g. "001.Black_footed_Albatross"
        names = [str(i) for i in class_ids]
    index = {c: i for i, c in enumerate(class_ids)}
    splits: dict[str, list[Item]] = {"train": [], "test": []}
    boxes: dict[Path, Box] = {}
    for image_id, (rel,) in images.items():
        if image_id not in is_train or image_id not in labels:
            raise SwrError(f"{root}: image id {image_id} ({rel}) is missing from "
                           f"train_test_split.txt or image_class_labels.txt")
        file = resolve_inside(root / "images", rel, f"{root / 'images.txt'} id {image_id}")
        splits["train" if is_train[image_id][0] == "1" else "test"].append(
            (file, index[int(labels[image_id][0])]))
        if image_id in raw_boxes:
            x, y, w, h = (float(v) for v in raw_boxes[image_id])
            boxes[file] = (x, y, x + w, y + h)
    return image_task(f"cub:{path}", root, names, splits["train"], splits["test"],
                      boxes=boxes or None, info={"protocol": "train_test_split.txt"
                                                 + (", cropped to bounding_boxes.txt"
                                                    if boxes else "")}, **kw)


# -- Stanford Cars ---------------------------------------------------------------------------
def _scalar(value) -> float:
    return float(np.asarray(value).reshape(-1)[0])


def _text(value) -> str:
    return value if isinstance(value, str) else str(np.asarray(value).reshape(-1)[0])


def _records(mat: dict, key: str, path: Path) -> list[dict]:
    if key not in mat:
        raise SwrError(f"{path} has no {key!r} variable; restore it from the dataset's devkit")
    return list(np.asarray(mat[key]).reshape(-1))


def _car_items(annos: list[dict], folder: Path, source: Path, boxes: dict[Path, Box],
               path_field: str) -> list[Item]:
    items = []
    for i, a in enumerate(annos):
        missing = [f for f in ("class", path_field, "bbox_x1") if f not in a]
        if missing:
            raise SwrError(f"{source}: annotation {i + 1} lacks {', '.join(missing)}; for the "
                           f"test set use cars_test_annos_withlabels.mat, which has classes")
        file = resolve_inside(folder, _text(a[path_field]), f"{source} annotation {i + 1}")
        # boxes are 1-based, inclusive pixel coordinates
        boxes[file] = (_scalar(a["bbox_x1"]) - 1, _scalar(a["bbox_y1"]) - 1,
                       _scalar(a["bbox_x2"]), _scalar(a["bbox_y2"]))
        items.append((file, int(_scalar(a["class"])) - 1))
    return items


def load_stanford_cars(path: str | os.PathLike, **kw) -> Task:
    """Stanford Cars (196 models; the official 8,144 / 8,041 split), cropped to the boxes."""
    root = Path(path)
    boxes: dict[Path, Box] = {}
    if (root / "cars_annos.mat").is_file():
        source = root / "cars_annos.mat"
        mat = read_mat(source)
        annos = _records(mat, "annotations", source)
        items = _car_items(annos, root, source, boxes, "relative_im_path")
        test_flags = [bool(_scalar(a.get("test", 0))) for a in annos]
        train = [it for it, t in zip(items, test_flags) if not t]
        test = [it for it, t in zip(items, test_flags) if t]
        names = [_text(n) for n in _records(mat, "class_names", source)]
    elif (root / "devkit" / "cars_train_annos.mat").is_file():
        meta_file = root / "devkit" / "cars_meta.mat"
        if not meta_file.is_file():
            raise SwrError(f"{meta_file} not found; restore it from car_devkit.tgz")
        names = [_text(n) for n in _records(read_mat(meta_file), "class_names", meta_file)]
        train_file = root / "devkit" / "cars_train_annos.mat"
        train = _car_items(_records(read_mat(train_file), "annotations", train_file),
                           root / "cars_train", train_file, boxes, "fname")
        test_file = next((p for p in (root / "cars_test_annos_withlabels.mat",
                                      root / "devkit" / "cars_test_annos_withlabels.mat")
                          if p.is_file()), None)
        if test_file is None:
            raise SwrError(f"{root}: cars_test_annos_withlabels.mat not found (devkit's "
                           f"cars_test_annos.mat has no classes); put it in {root} or "
                           f"{root / 'devkit'}")
        test = _car_items(_records(read_mat(test_file), "annotations", test_file),
                          root / "cars_test", test_file, boxes, "fname")
    elif _split_folders(root) is not None:
        return folder_task("stanford-cars", root, cropped="crop" in root.name.lower(), **kw)
    else:
        raise SwrError(f"Stanford Cars not found in {root}: expected devkit/ with "
                       f"cars_train/ and cars_test/, cars_annos.mat with car_ims/, or train/ "
                       f"and test/ class folders")
    bad = sorted({y for _, y in train + test if not 0 <= y < len(names)})
    if bad:
        raise SwrError(f"{root}: class {bad[0] + 1} is out of range for the {len(names)} "
                       f"class names; restore the annotation files")
    return image_task(f"stanford-cars:{path}", root, names, train, test, boxes=boxes,
                      info={"protocol": "official train/test annotations, cropped to boxes"},
                      **kw)


# -- Oxford Flowers-102 ----------------------------------------------------------------------
def load_flowers102(path: str | os.PathLike, **kw) -> Task:
    """Oxford Flowers-102 with the official train / val / test ids of ``setid.mat``."""
    root = Path(path)
    labels_file, setid_file = root / "imagelabels.mat", root / "setid.mat"
    if not labels_file.is_file():
        if _split_folders(root) is not None:
            return folder_task("flowers102", root, **kw)
        raise SwrError(f"Oxford Flowers-102 not found in {root}: expected imagelabels.mat, "
                       f"setid.mat and jpg/, or train/ [valid/] test/ class folders")
    if not setid_file.is_file():
        raise SwrError(f"{setid_file} not found; download setid.mat with the dataset")
    labels = np.asarray(read_mat(labels_file).get("labels", [])).reshape(-1).astype(int)
    if labels.size == 0:
        raise SwrError(f"{labels_file} has no 'labels' variable; restore the file")
    ids = read_mat(setid_file)
    class_ids = sorted(set(labels.tolist()))
    names = [f"{c:03d}" for c in class_ids]  # the release ships numbers, not names
    index = {c: i for i, c in enumerate(class_ids)}
    splits = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        if key not in ids:
            raise SwrError(f"{setid_file} has no {key!r} variable; restore the file")
        chosen = np.asarray(ids[key]).reshape(-1).astype(int)
        if chosen.size and (chosen.min() < 1 or chosen.max() > labels.size):
            raise SwrError(f"{setid_file}: {key} names image {chosen.max()}, but "
                           f"imagelabels.mat labels {labels.size} images")
        splits[split] = [(root / "jpg" / f"image_{i:05d}.jpg", index[labels[i - 1]])
                         for i in chosen]
    return image_task(f"flowers102:{path}", root, names, splits["train"], splits["test"],
                      splits["val"], info={"protocol": "setid.mat trnid/valid/tstid"}, **kw)


# -- WikiArt and Sketch ----------------------------------------------------------------------
def load_wikiart(path: str | os.PathLike, **kw) -> Task:
    """WikiArt by class folder (artists in Piggyback's 195-class version)."""
    return folder_task("wikiart", path, **kw)


def load_sketch(path: str | os.PathLike, **kw) -> Task:
    """TU-Berlin sketches by class folder; a root holding ``png/`` is read as ``png/``."""
    root = Path(path)
    if _split_folders(root) is None and (root / "png").is_dir():
        return folder_task("sketch", root / "png", **kw)
    return folder_task("sketch", root, **kw)


LOADERS = {"cub": load_cub, "stanford-cars": load_stanford_cars, "flowers102": load_flowers102,
           "wikiart": load_wikiart, "sketch": load_sketch}

#: folder names each dataset is found under in an ``imagenet-to-sketch:<root>`` folder:
#: the archives' own names and Piggyback's re-packaged ones (compared ignoring case,
#: ``-`` and ``_``)
FOLDER_NAMES = {
    "cub": ("CUB_200_2011", "CUBS_Cropped", "cubs", "cub", "cub200"),
    "stanford-cars": ("stanford_cars", "Stanford_Cars_Cropped", "stanford-cars", "cars"),
    "flowers102": ("flowers102", "flowers-102", "oxford-102-flowers", "flowers"),
    "wikiart": ("WikiArt", "wikiart"),
    "sketch": ("Sketches", "sketch", "sketches", "tu-berlin", "sketches_png"),
}


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def locate(root: str | os.PathLike) -> dict[str, Path]:
    """``{dataset kind: folder}`` for the five datasets under ``root`` (see FOLDER_NAMES).

    A folder holding only the archive's own top folder (``CUB_200_2011/CUB_200_2011``,
    as some re-packagings nest) is entered.
    """
    root = Path(root)
    if not root.is_dir():
        raise SwrError(f"imagenet-to-sketch folder not found: {root}")
    children = {_norm(d.name): d for d in sorted(root.iterdir()) if d.is_dir()}
    found, missing = {}, []
    for kind, names in FOLDER_NAMES.items():
        folder = next((children[_norm(n)] for n in names if _norm(n) in children), None)
        if folder is None:
            missing.append(f"{kind} ({'/ or '.join(names[:2])}/)")
            continue
        inner = [d for d in folder.iterdir() if d.is_dir() and _norm(d.name) == _norm(folder.name)]
        found[kind] = inner[0] if len(inner) == 1 else folder
    if missing:
        raise SwrError(f"imagenet-to-sketch: {root} lacks {', '.join(missing)}; see the README "
                       f"section 'ImageNet-to-Sketch' for the layout")
    return found


__all__ = ["FOLDER_NAMES", "LOADERS", "folder_task", "image_task", "load_cub",
           "load_flowers102", "load_sketch", "load_stanford_cars", "load_wikiart", "locate"]
