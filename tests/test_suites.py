"""Suites and the ImageNet-to-Sketch datasets on tiny fixtures in their real layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swr.errors import SwrError
from swr.tasks import expand_tasks, get_suite, get_task
from swr.tasks.imagenet_to_sketch import CroppedReader, locate
from swr.tasks.matfile import read_mat, write_mat

from fixtures import write_clip

SIZE = 24  # image_size passed to every loader: small tensors, fast tests


def _image(path: Path, size=(40, 30), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ---------------------------------------------------------------- MAT-files
def test_matfile_round_trip_of_what_the_annotations_hold(tmp_path):
    annos = [{"bbox_x1": np.array(3), "bbox_y1": np.array(4), "fname": "00001.jpg",
              "class": np.array(196)}, {"bbox_x1": np.array(1.5), "bbox_y1": np.array(70000),
                                        "fname": "00002.jpg", "class": np.array(1)}]
    for compress in (True, False):
        path = tmp_path / f"a{compress}.mat"
        write_mat(path, {"annotations": annos, "class_names": ["AM General Hummer", "Audi"],
                         "labels": np.array([77, 1, 300]), "grid": np.arange(6).reshape(2, 3)},
                  compress=compress)
        mat = read_mat(path)
        got = mat["annotations"].reshape(-1)
        assert [a["fname"] for a in got] == ["00001.jpg", "00002.jpg"]
        assert float(got[0]["class"][0, 0]) == 196 and float(got[1]["bbox_x1"][0, 0]) == 1.5
        assert float(got[1]["bbox_y1"][0, 0]) == 70000
        assert list(mat["class_names"].reshape(-1)) == ["AM General Hummer", "Audi"]
        assert mat["labels"].tolist() == [[77, 1, 300]]
        assert mat["grid"].tolist() == [[0, 1, 2], [3, 4, 5]]  # column-major order kept


def test_matfile_refuses_other_files_with_one_line(tmp_path):
    (tmp_path / "x.mat").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(SwrError, match="7.3"):
        read_mat(tmp_path / "x.mat")
    (tmp_path / "y.mat").write_text("labels = [1 2 3]")
    with pytest.raises(SwrError, match="not a MATLAB level-5"):
        read_mat(tmp_path / "y.mat")
    write_mat(tmp_path / "z.mat", {"labels": np.arange(50)}, compress=True)
    data = (tmp_path / "z.mat").read_bytes()
    (tmp_path / "z.mat").write_bytes(data[:-10])
    with pytest.raises(SwrError, match="damaged"):
        read_mat(tmp_path / "z.mat")


# ---------------------------------------------------------------- dataset layouts
def make_cub(root: Path, n_classes=3, per_class=4) -> Path:
    """CUB_200_2011 as extracted: the id tables, bounding boxes and images/."""
    images, split, labels, boxes, classes = [], [], [], [], []
    k = 0
    for c in range(1, n_classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {folder}")
        for i in range(per_class):
            k += 1
            # the bird (a coloured block) sits in a grey picture; the box marks it
            img = Image.new("RGB", (60, 50), (128, 128, 128))
            img.paste(Image.new("RGB", (20, 10), (40 * c, 0, 0)), (30, 20))
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            img.save(root / "images" / folder / f"Bird_{c}_{i}.jpg")
            images.append(f"{k} {folder}/Bird_{c}_{i}.jpg")
            split.append(f"{k} {1 if i < per_class - 1 else 0}")
            labels.append(f"{k} {c}")
            boxes.append(f"{k} 30.0 20.0 20.0 10.0")
    for name, lines in (("images", images), ("train_test_split", split),
                        ("image_class_labels", labels), ("bounding_boxes", boxes),
                        ("classes", classes)):
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_cars_devkit(root: Path, n_classes=3, per_class=3) -> Path:
    """Stanford Cars as torchvision lays it out: devkit/, cars_train/, cars_test/."""
    anno = {"train": [], "test": []}
    k = 0
    for c in range(1, n_classes + 1):
        for i in range(per_class):
            k += 1
            split = "train" if i < per_class - 1 else "test"
            name = f"{k:05d}.jpg"
            _image(root / f"cars_{split}" / name, (50, 40), (0, 60 * c, 0))
            anno[split].append({"bbox_x1": np.array(5), "bbox_y1": np.array(6),
                                "bbox_x2": np.array(30), "bbox_y2": np.array(25),
                                "class": np.array(c), "fname": name})
    (root / "devkit").mkdir(parents=True)
    write_mat(root / "devkit" / "cars_meta.mat",
              {"class_names": [f"Make Model {c}" for c in range(1, n_classes + 1)]})
    write_mat(root / "devkit" / "cars_train_annos.mat", {"annotations": anno["train"]})
    write_mat(root / "cars_test_annos_withlabels.mat", {"annotations": anno["test"]})
    return root


def make_flowers(root: Path, n_classes=3) -> Path:
    """Flowers-102 as downloaded: imagelabels.mat, setid.mat and jpg/image_NNNNN.jpg."""
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    k = 0
    for c in range(1, n_classes + 1):
        for key in ("trnid", "trnid", "valid", "tstid", "tstid"):
            k += 1
            _image(root / "jpg" / f"image_{k:05d}.jpg", (36, 30), (0, 0, 70 * c))
            labels.append(c)
            ids[key].append(k)
    write_mat(root / "imagelabels.mat", {"labels": np.array(labels)})
    write_mat(root / "setid.mat", {k: np.array(v) for k, v in ids.items()})
    return root


def make_class_folders(root: Path, classes=("artist_a", "artist_b"), per_class=5,
                       split: bool = True) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            where = (root / ("train" if i < per_class - 2 else "test")) if split else root
            _image(where / name / f"{i}.png", (32, 32), (90 * c, 90, 0))
    return root


def make_suite(root: Path) -> Path:
    make_cub(root / "CUB_200_2011")
    make_cars_devkit(root / "stanford_cars")
    make_flowers(root / "flowers102")
    make_class_folders(root / "WikiArt")
    make_class_folders(root / "Sketches" / "png", ("airplane", "bear", "cat"), split=False)
    return root


def test_cub_official_split_labels_and_boxes(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    task = get_task(f"cub:{root}", image_size=SIZE)
    assert task.class_names == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    assert len(task.test) == 3 and len(task.train) + len(task.val) == 9 and len(task.val) == 3
    assert [y for _, y in task.test.items] == [0, 1, 2]
    x, y = task.test[1]
    assert x.shape == (3, SIZE, SIZE) and y == 1
    # cropped to the box: the picture is the red block only, no grey border left
    crop = CroppedReader(task.test.decode.boxes)(task.test.items[1][0])
    assert crop.size == (20, 10)
    assert abs(np.asarray(crop)[..., 0].mean() - 80) < 12 and np.asarray(crop)[..., 1].max() < 40


def test_stanford_cars_devkit_and_single_file_release(tmp_path):
    root = make_cars_devkit(tmp_path / "stanford_cars")
    task = get_task(f"stanford-cars:{root}", image_size=SIZE)
    assert task.class_names == ["Make Model 1", "Make Model 2", "Make Model 3"]
    assert len(task.test) == 3 and sorted(y for _, y in task.test.items) == [0, 1, 2]
    assert task.info["cropped"]
    assert task.train[0][0].shape == (3, SIZE, SIZE)
    # cars_annos.mat + car_ims/: one table with a test flag
    other = tmp_path / "cars_all"
    annos = []
    for k in range(6):
        rel = f"car_ims/{k:06d}.jpg"
        _image(other / rel, (40, 40))
        annos.append({"relative_im_path": rel, "bbox_x1": np.array(1), "bbox_y1": np.array(1),
                      "bbox_x2": np.array(20), "bbox_y2": np.array(20),
                      "class": np.array(k % 2 + 1), "test": np.array(int(k >= 4))})
    write_mat(other / "cars_annos.mat", {"annotations": annos, "class_names": ["a", "b"]})
    task = get_task(f"stanford-cars:{other}", image_size=SIZE)
    assert len(task.test) == 2 and len(task.train) + len(task.val) == 4
    # without the labelled test table the message names the file to add
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(SwrError, match="cars_test_annos_withlabels.mat"):
        get_task(f"stanford-cars:{root}", image_size=SIZE)


def test_flowers_official_ids(tmp_path):
    root = make_flowers(tmp_path / "flowers102")
    task = get_task(f"flowers102:{root}", image_size=SIZE)
    assert task.class_names == ["001", "002", "003"]
    assert (len(task.train), len(task.val), len(task.test)) == (6, 3, 6)
    assert task.val.items[0][0].name == "image_00003.jpg"
    write_mat(root / "setid.mat", {"trnid": np.array([1]), "valid": np.array([2]),
                                   "tstid": np.array([99])})
    with pytest.raises(SwrError, match="setid.mat: tstid names image 99"):
        get_task(f"flowers102:{root}", image_size=SIZE)


def test_class_folder_layouts_and_fixed_test_draw(tmp_path):
    wikiart = make_class_folders(tmp_path / "WikiArt")
    task = get_task(f"wikiart:{wikiart}", image_size=SIZE)
    assert task.class_names == ["artist_a", "artist_b"] and len(task.test) == 4
    sketch = make_class_folders(tmp_path / "tu" / "png", ("bear", "cat"), per_class=10,
                                split=False)
    a = get_task(f"sketch:{sketch.parent}", image_size=SIZE, seed=0)
    b = get_task(f"sketch:{sketch.parent}", image_size=SIZE, seed=3)
    assert len(a.test) == 4  # 20% of 10 per class
    assert a.test.items == b.test.items  # the test draw ignores the run seed
    assert a.val.items != b.val.items or a.train.items != b.train.items


def test_imagenet_to_sketch_suite_expands_and_loads(tmp_path):
    root = make_suite(tmp_path / "i2s")
    specs = get_suite(f"imagenet-to-sketch:{root}")
    assert [s.split(":")[0] for s in specs] == ["cub", "stanford-cars", "flowers102", "wikiart",
                                               "sketch"]
    for spec in specs:
        task = get_task(spec, image_size=SIZE)
        assert task.num_classes >= 2 and len(task.test) > 0
        assert task.train[0][0].shape == (3, SIZE, SIZE)
    assert expand_tasks(["glyphs:sketch", f"imagenet-to-sketch:{root}", specs[0]])[1:] == specs
    # a suite is not a task
    with pytest.raises(SwrError, match="suite of 5 tasks"):
        get_task(f"imagenet-to-sketch:{root}")
    import shutil

    shutil.rmtree(root / "WikiArt")
    with pytest.raises(SwrError, match="lacks wikiart"):
        locate(root)


def test_embedded_suites_expand_from_their_registries():
    from swr.tasks.glyphs import TARGETS
    from swr.tasks.kws_synth import TARGET_LANGS

    assert get_suite("glyphs:all") == [f"glyphs:{t}" for t in TARGETS]
    assert get_suite("kws-synth:all") == [f"kws-synth:{lang}" for lang in TARGET_LANGS]
    assert get_suite("glyphs:sketch") is None
    with pytest.raises(SwrError, match="suite"):
        get_task("kws-synth:all")


def _mswc_language(root: Path, lang: str, words=("ja", "nein", "drei")) -> None:
    rows, i = [], 0
    for word in words:
        for set_name in ["TRAIN"] * 3 + ["DEV", "TEST"]:
            link = f"{word}/common_voice_{lang}_{i}.opus"
            write_clip(root / lang / "clips" / word / f"common_voice_{lang}_{i}.wav", i)
            rows.append({"SET": set_name, "LINK": link, "WORD": word, "VALID": "True",
                         "SPEAKER": "s", "GENDER": "NAN"})
            i += 1
    with open(root / lang / f"{lang}_splits.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_mswc_multilingual_suite(tmp_path):
    root = tmp_path / "mswc"
    _mswc_language(root, "de")
    _mswc_language(root, "fr", ("oui", "non", "trois"))
    specs = get_suite(f"mswc:{root}:de, fr")
    assert specs == [f"mswc:{root}:de", f"mswc:{root}:fr"]
    assert get_suite(f"mswc:{root}:de") is None  # one language is one task
    tasks = [get_task(s, n_keywords=2, min_count=2) for s in specs]
    assert tasks[1].class_names == ["non", "oui", "_unknown_", "_silence_"]
    x, _ = tasks[0].train[0]
    assert x.shape == (1, 40, 101) and torch.isfinite(x).all()
    for bad in (f"mswc:{root}:de,de", f"mswc:{root}:de,", "mswc::de,fr"):
        with pytest.raises(SwrError):
            get_suite(bad)


def test_repackaged_folders_are_read_too(tmp_path):
    """Piggyback's CUBS_Cropped and the train/valid/test Flowers copies."""
    cub = make_class_folders(tmp_path / "CUBS_Cropped", ("001.a", "002.b"))
    task = get_task(f"cub:{cub}", image_size=SIZE)
    assert task.info["cropped"] and task.class_names == ["001.a", "002.b"]
    flowers = make_class_folders(tmp_path / "flowers", ("1", "2"), per_class=4)
    make_class_folders(flowers / "valid", ("1", "2"), per_class=1, split=False)
    task = get_task(f"flowers102:{flowers}", image_size=SIZE)
    assert len(task.val) == 2 and "val from valid/" in task.info["protocol"]
    make_class_folders(flowers / "test", ("3",), per_class=1, split=False)
    with pytest.raises(SwrError, match="different classes"):
        get_task(f"flowers102:{flowers}", image_size=SIZE)
    with pytest.raises(SwrError, match="CUB-200-2011 not found"):
        get_task(f"cub:{tmp_path / 'flowers' / 'valid'}", image_size=SIZE)


def test_single_task_commands_refuse_a_suite_with_its_tasks(tmp_path):
    with pytest.raises(SwrError, match=r"suite of 2 tasks \(mswc:/d:de, mswc:/d:fr\)"):
        get_task("mswc:/d:de,fr")


def test_bench_runs_a_suite_task_by_task(tmp_path):
    """swr bench --task mswc:<root>:de,fr: one task per language, averaged in results.md,
    and each run's epochs.csv under runs/."""
    from fixtures import tiny_checkpoint

    from swr.app.bench import BenchConfig, run_bench

    root = tmp_path / "mswc"
    words = [f"w{i}" for i in range(10)]  # the default protocol: 10 keywords, 10+ TRAIN clips
    for lang in ("de", "fr"):
        rows, i = [], 0
        for word in words:
            for set_name in ["TRAIN"] * 10 + ["DEV", "TEST"]:
                link = f"{word}/c{lang}{i}.wav"
                write_clip(root / lang / "clips" / link, i % 7, seconds=0.5)
                rows.append({"SET": set_name, "LINK": link, "WORD": word})
                i += 1
        with open(root / lang / f"{lang}_splits.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["SET", "LINK", "WORD"])
            w.writeheader()
            w.writerows(rows)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", n_classes=12)
    cfg = BenchConfig(tasks=[f"mswc:{root}:de,fr"], checkpoint=str(ckpt), methods=["linear"],
                      budgets=["5%"], out=str(tmp_path / "b"), seeds=1, epochs=1, workers=1,
                      device="cpu", progress=False)
    result = run_bench(cfg, log=lambda _: None)
    assert sorted(r["task"] for r in result) == [f"mswc:{root}:de", f"mswc:{root}:fr"]
    md = (tmp_path / "b" / "results.md").read_text()
    assert "Average over tasks" in md
    logs = sorted((tmp_path / "b" / "runs").glob("*/epochs.csv"))
    assert len(logs) == 2 and all(len(p.read_text().splitlines()) == 2 for p in logs)


@pytest.mark.parametrize("compress", [False, True])
def test_matfile_damaged_bytes_give_one_swr_error(tmp_path, compress):
    """Any corruption of a real-format file is a SwrError naming it, never a crash."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    good = tmp_path / "good.mat"
    write_mat(good, {"annotations": [{"fname": "a.jpg", "class": np.array(3)}],
                     "labels": np.arange(300), "names": ["x", "yz"]}, compress=compress)
    data = good.read_bytes()

    @settings(max_examples=150, deadline=None)
    @given(st.integers(128, len(data) - 1), st.binary(min_size=1, max_size=8))
    def damaged(pos, junk):
        path = tmp_path / "bad.mat"
        path.write_bytes(data[:pos] + junk + data[pos + len(junk):])
        try:
            read_mat(path)
        except SwrError as e:
            assert str(path) in str(e) and "\n" not in str(e)

    damaged()


def test_shots_suffix_keeps_at_most_n_training_examples_per_class(tmp_path):
    """``?shots=N``: at most N training examples per class, drawn with the seed; the
    other splits whole; a new id and data hash; file-backed splits are never decoded."""
    import torch

    from swr.errors import SwrError
    from swr.tasks import get_task, task_data_path
    from swr.tasks.base import Task, few_shot, split_labels, tensor_split
    from swr.tasks.datasets import FileDataset

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 10 + [1] * 6 + [2] * 2)
    task = Task(id="toy", modality="image", class_names=["a", "b", "c"],
                train=tensor_split(torch.randn(18, 3, generator=g), y),
                val=tensor_split(torch.randn(5, 3), torch.zeros(5)),
                test=tensor_split(torch.randn(4, 3), torch.zeros(4)), input_shape=(3,))
    few = few_shot(task, 4, seed=0)
    counts = torch.bincount(few.train.tensors[1], minlength=3).tolist()
    assert counts == [4, 4, 2] and few.info["shots"] == {"a": 4, "b": 4, "c": 2}
    assert few.id == "toy?shots=4" and few.val is task.val and few.test is task.test
    assert few.data_hash() != task.data_hash()
    # the same seed draws the same examples, another seed others
    assert torch.equal(few_shot(task, 4, seed=0).train.tensors[0], few.train.tensors[0])
    assert not torch.equal(few_shot(task, 4, seed=1).train.tensors[0], few.train.tensors[0])
    with pytest.raises(SwrError, match="shots must be a positive integer"):
        few_shot(task, 0)

    def no_decode(path):
        raise AssertionError(f"decoded {path}")

    files = FileDataset([(tmp_path / f"{i}.wav", int(c)) for i, c in enumerate(y)], no_decode)
    few_files = few_shot(Task(id="f", modality="audio", class_names=["a", "b", "c"],
                              train=files, val=files, test=files, input_shape=(1,)), 3)
    assert sorted(split_labels(few_files.train)) == [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(SwrError, match=r"shots must be a positive integer, e\.g\. glyphs:x\?"):
        get_task("glyphs:x?shots=zero")
    assert task_data_path("imagefolder:/data/sk?shots=5") == "/data/sk"
