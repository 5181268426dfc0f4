"""kws-synth: espeak-ng synthesis, the miniature suite, determinism and the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from swr.errors import SwrError
from swr.tasks import kws_synth as ks
from swr.tasks.audio import SAMPLE_RATE, read_audio
from swr.tasks.features import SpecAugment

TINY = {"speakers": (2, 1, 1, 1), "reps": 1, "progress": False}
SPLITS = ("train", "val", "test", "shift_test")


def tensors(task) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {s: getattr(task, s).tensors for s in SPLITS}


def speakers_of(cache: str | Path) -> dict[str, set[int]]:
    return {s: set(load_file(str(Path(cache) / f"{s}.safetensors"))["speaker"].tolist())
            for s in SPLITS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("kws")
    return root, ks.load_kws_synth("de", root=root, **TINY)


def test_synthesize_is_speech_at_16k():
    wav = ks.synthesize("seven", "en")
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert 0.2 * SAMPLE_RATE < wav.size < 1.5 * SAMPLE_RATE
    assert np.abs(wav).max() > 0.1 and np.abs(wav).max() <= 1.0
    slow = ks.synthesize("seven", "en+f2", rate=100)
    fast = ks.synthesize("seven", "en+f2", rate=300)
    assert slow.size > 1.5 * fast.size


def test_seeded_synthesis_is_reproducible_in_fresh_processes():
    # f2 is a breathy voice: without the seed espeak-ng draws its noise from the clock
    code = ("import hashlib; from swr.tasks.kws_synth import synthesize; "
            "print(hashlib.sha256(synthesize('seven', 'en+f2', seed=7).tobytes()).hexdigest())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].strip()) == 64


def test_synthesize_rejects_bad_input():
    with pytest.raises(SwrError, match="no voice"):
        ks.synthesize("yes", "xx-nonexistent")
    with pytest.raises(SwrError, match="rate"):
        ks.synthesize("yes", "en", rate=10)


def test_language_tables():
    assert ks.SOURCE_LANG == "en" and len(ks.TARGET_LANGS) >= 6
    assert set(ks.TARGET_LANGS) | {"en"} == set(ks.LANGUAGES)
    for lang, words in ks.LANGUAGES.items():
        assert len(words) == 10 and len(set(words)) == 10, lang
        fillers = ks._FILLERS[lang]
        assert len(fillers) >= 20 and not set(fillers) & set(words), lang
    assert not set(ks._VARIANTS) & set(ks._SHIFT_VARIANTS)


def test_every_voice_exists():
    for lang, accents in ks._ACCENTS.items():
        for accent in accents:
            assert ks.synthesize(ks.LANGUAGES[lang][0], f"{accent}+m3").size > 1000
    for variant in ks._VARIANTS + ks._SHIFT_VARIANTS:
        assert np.abs(ks.synthesize("go", f"en+{variant}")).max() > 0.01, variant


def test_tiny_suite_layout(tiny):
    _, task = tiny
    assert task.id == "kws-synth:de" and task.modality == "audio"
    assert task.class_names == ks.LANGUAGES["de"] + ["_unknown_", "_silence_"]
    assert task.num_classes == 12 and task.input_shape == (1, 40, 101)
    assert isinstance(task.train_transform, SpecAugment)
    counts = {"train": 2, "val": 1, "test": 1, "shift_test": 1}
    assert task.info["speakers"] == counts
    for split, (x, y) in tensors(task).items():
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 40, 101)
        assert torch.isfinite(x).all()
        # every class once per speaker and repetition
        assert torch.bincount(y, minlength=12).tolist() == [counts[split]] * 12
    assert task.info["clips"]["train"] == 24


def test_speakers_disjoint_and_shift_voices_unseen(tiny):
    _, task = tiny
    ids = speakers_of(task.info["cache"])
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not ids[a] & ids[b], (a, b)
    manifest = json.loads((Path(task.info["cache"]) / "manifest.json").read_text())
    assert manifest["version"] == ks.VERSION and manifest["seed"] == 0
    for split in SPLITS:
        pool = ks._SHIFT_VARIANTS if split == "shift_test" else ks._VARIANTS
        for spk in manifest["splits"][split]["speakers"]:
            assert spk["voice"].split("+")[1] in pool


def test_silence_is_quieter_than_words(tiny):
    # not a guarantee per clip (SNR varies), but on average words add energy
    _, task = tiny
    x, y = task.train.tensors
    energy = x.exp().mean(dim=(1, 2, 3))
    assert energy[y == 11].mean() < energy[y < 10].mean()


def test_deterministic_from_seed(tiny, tmp_path):
    _, task = tiny
    again = ks.load_kws_synth("de", root=tmp_path / "a", **TINY)
    for (x1, y1), (x2, y2) in zip(tensors(task).values(), tensors(again).values()):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = ks.load_kws_synth("de", root=tmp_path / "b", seed=1, **TINY)
    assert not torch.equal(task.train.tensors[0], other.train.tensors[0])


def test_cache_reused(tiny, monkeypatch):
    root, task = tiny
    manifest = Path(task.info["cache"]) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(ks, "_generate_locked", no_generation)
    again = ks.load_kws_synth("de", root=root, **TINY)
    assert manifest.stat().st_mtime_ns == stamp
    assert torch.equal(again.test.tensors[0], task.test.tensors[0])


def test_regenerates_when_parameters_change(tmp_path):
    first = ks.load_kws_synth("de", root=tmp_path, **TINY)
    bigger = ks.load_kws_synth("de", root=tmp_path, speakers=(3, 1, 1), reps=1,
                               progress=False, keep_wav=True)
    assert bigger.info["cache"] == first.info["cache"]
    assert bigger.info["speakers"] == {"train": 3, "val": 1, "test": 1, "shift_test": 1}
    assert len(bigger.train) == 36
    manifest = json.loads((Path(bigger.info["cache"]) / "manifest.json").read_text())
    clip = manifest["splits"]["val"]["clips"][0]
    wav = read_audio(Path(bigger.info["cache"]) / clip["file"])
    assert wav.shape == (16000,) and wav.abs().max() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".de.lock", "de"]


def test_a_speakers_spec_is_its_own_task_beside_the_default_cache(tmp_path):
    """``kws-synth:<lang>?speakers=T,V,E`` generates those split sizes under a root of its
    own (the default-size cache is neither used nor replaced) and keeps the modifier in
    the task id; a malformed one is refused naming the form."""
    from swr.tasks import get_task

    first = ks.load_kws_synth("de", root=tmp_path, **TINY)
    task = get_task("kws-synth:de?speakers=2,1,1", root=tmp_path, reps=1, progress=False)
    assert task.id == "kws-synth:de?speakers=2,1,1"
    assert task.info["speakers"] == {"train": 2, "val": 1, "test": 1, "shift_test": 1}
    assert Path(task.info["cache"]) == tmp_path / "speakers-2-1-1-1" / "de"
    again = ks.load_kws_synth("de", root=tmp_path, **TINY)  # untouched: not regenerated
    assert again.info["cache"] == first.info["cache"]
    assert torch.equal(again.train.tensors[0], first.train.tensors[0])
    for bad in ("de?speakers=2,1", "de?speakers=2,0,1", "de?voices=2,1,1"):
        with pytest.raises(SwrError, match=r"speaker counts .* e\.g\. kws-synth:de\?speakers="):
            get_task(f"kws-synth:{bad}", root=tmp_path)


def test_failed_generation_keeps_old_cache(tiny, monkeypatch):
    root, task = tiny

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-generation")

    monkeypatch.setattr(ks, "_render_all", crash)
    with pytest.raises(RuntimeError, match="killed"):
        ks.load_kws_synth("de", root=root, seed=3, **TINY)
    assert sorted(p.name for p in root.iterdir()) == [".de.lock", "de"]
    monkeypatch.setattr(ks, "_generate_locked", crash)
    again = ks.load_kws_synth("de", root=root, **TINY)
    assert torch.equal(again.train.tensors[0], task.train.tensors[0])


def test_worker_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(ks._ACCENTS, "de", ["xx-nonexistent"])
    with pytest.raises(RuntimeError, match="(?s)worker failed.*no voice"):
        ks.load_kws_synth("de", root=tmp_path, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".de.lock"]


def test_bad_arguments():
    with pytest.raises(SwrError, match="known: en, de"):
        ks.load_kws_synth("klingon")
    with pytest.raises(SwrError, match="speakers"):
        ks.load_kws_synth("de", speakers=(1, 0, 1))
    with pytest.raises(SwrError, match="seed"):
        ks.generate("de", seed=-1)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SWR_CACHE", str(tmp_path))
    assert ks._cache_root(None) == tmp_path / "kws-synth"
    monkeypatch.delenv("SWR_CACHE")
    assert ks._cache_root(None) == Path.home() / ".cache" / "swr" / "kws-synth"
    assert ks._cache_root(tmp_path / "x") == tmp_path / "x"
