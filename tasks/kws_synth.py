"""The embedded multilingual spoken-words suite ``kws-synth:<lang>``.

Keyword spotting in the Speech Commands 12-class protocol (10 keywords,
``_unknown_``, ``_silence_``), synthesised offline with espeak-ng (the
``espeakng-loader`` wheel, driven through ctypes) so that the project's main job
runs with no download. English is the source task; every other language is a
small transfer target with its own keywords.

Variety comes from two places. A *speaker* is a voice setting: an accent (the
language's espeak-ng voices), a voice variant (``+m3``, ``+f2``, klatt, ...), and
a base pitch, pitch range and speaking rate; each utterance jitters those and its
punctuation (statement, exclamation, question). Every clip then goes through the
same augmentation whatever its class: a random channel colouration, optional
reverb (exponentially decaying noise impulse response), a random level, a random
position inside the 1 s clip, and background noise (white/pink/brown, mains hum
or babble of other speech) at a random SNR. Splits hold disjoint speakers;
``shift_test`` holds speakers of voice variants never seen in training, at lower
SNR and with more reverb.

Generation is deterministic from ``seed`` and cached as log-mel features in a
folder per language (``manifest.json`` + one safetensors file per split) under
``$SWR_CACHE/kws-synth`` (default ``~/.cache/swr/kws-synth``). The folder is
regenerated when the generation config differs from the manifest's and replaced
atomically, so a killed generation never leaves a half cache behind.

espeak-ng keeps synthesis state across utterances (pitch-flutter phase, gain
control, echo buffers) that its API cannot reset, so the same text comes out
slightly differently depending on what was spoken before in the process; and it
seeds the breath noise of breathy voices from the clock. The cache is therefore
rendered in fresh worker interpreters, each speaking a fixed share of the
speakers in a fixed order, with the noise seeded per utterance: that makes it
reproducible (bit for bit on one machine, whatever the number of workers), and
the workers run in parallel.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from safetensors.torch import load_file, save_file
from swr.progress import progress_bar

from swr.errors import SwrError
from swr.io import cache_dir, write_json

from .audio import CLIP_SAMPLES, SAMPLE_RATE, fix_length, write_wav
from .base import Task, tensor_split
from .features import LogMel, SpecAugment
from .options import SpecOption, parse_options

try:  # advisory locking keeps concurrent loaders (e.g. Ray workers) from racing
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking
    fcntl = None  # type: ignore[assignment]

# Bump when the rendering code changes what it produces for the same config, so
# existing caches are regenerated.
VERSION = 1

SOURCE_LANG = "en"
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
SPLITS = ("train", "val", "test", "shift_test")

LANGUAGES: dict[str, list[str]] = {
    "en": ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"],
    "de": ["ja", "nein", "hoch", "runter", "links", "rechts", "an", "aus", "halt", "los"],
    "fr": ["oui", "non", "haut", "bas", "gauche", "droite", "allume", "éteins", "stop",
           "avance"],
    "es": ["sí", "no", "arriba", "abajo", "izquierda", "derecha", "enciende", "apaga",
           "para", "sigue"],
    "it": ["sì", "no", "su", "giù", "sinistra", "destra", "accendi", "spegni", "ferma",
           "vai"],
    "nl": ["ja", "nee", "omhoog", "omlaag", "links", "rechts", "aan", "uit", "stop", "ga"],
    "pt": ["sim", "não", "cima", "baixo", "esquerda", "direita", "liga", "desliga", "pare",
           "vai"],
    "pl": ["tak", "nie", "góra", "dół", "lewo", "prawo", "włącz", "wyłącz", "stop",
           "start"],
    "ru": ["да", "нет", "вверх", "вниз", "влево", "вправо", "включи", "выключи", "стоп",
           "вперёд"],
}
TARGET_LANGS: tuple[str, ...] = tuple(lang for lang in LANGUAGES if lang != SOURCE_LANG)

# Words of the ``_unknown_`` class (English: the Speech Commands auxiliary words);
# also the material of the babble noise, which must never contain a keyword.
_FILLERS: dict[str, list[str]] = {
    "en": ["bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
           "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "backward", "forward", "follow", "learn", "visual"],
    "de": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
           "Haus", "Katze", "Hund", "Baum", "Vogel", "Bett", "Tisch", "Wasser", "Blume",
           "Sonne", "Fenster", "Apfel", "Straße", "Buch", "Lampe"],
    "fr": ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf",
           "maison", "chat", "chien", "arbre", "oiseau", "lit", "table", "eau", "fleur",
           "soleil", "fenêtre", "pomme", "rue", "livre", "lampe"],
    "es": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve",
           "casa", "gato", "perro", "árbol", "pájaro", "cama", "mesa", "agua", "flor", "sol",
           "ventana", "manzana", "calle", "libro", "lámpara"],
    "it": ["zero", "uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto", "nove",
           "casa", "gatto", "cane", "albero", "uccello", "letto", "tavolo", "acqua", "fiore",
           "sole", "finestra", "mela", "strada", "libro", "lampada"],
    "nl": ["nul", "een", "twee", "drie", "vier", "vijf", "zes", "zeven", "acht", "negen",
           "huis", "kat", "hond", "boom", "vogel", "bed", "tafel", "water", "bloem", "zon",
           "raam", "appel", "straat", "boek", "lamp"],
    "pt": ["zero", "um", "dois", "três", "quatro", "cinco", "seis", "sete", "oito", "nove",
           "casa", "gato", "cão", "árvore", "pássaro", "cama", "mesa", "água", "flor", "sol",
           "janela", "maçã", "rua", "livro", "lâmpada"],
    "pl": ["zero", "jeden", "dwa", "trzy", "cztery", "pięć", "sześć", "siedem", "osiem",
           "dziewięć", "dom", "kot", "pies", "drzewo", "ptak", "łóżko", "stół", "woda",
           "kwiat", "słońce", "okno", "jabłko", "ulica", "książka", "lampa"],
    "ru": ["ноль", "один", "два", "три", "четыре", "пять", "шесть", "семь", "восемь",
           "девять", "дом", "кошка", "собака", "дерево", "птица", "кровать", "стол", "вода",
           "цветок", "солнце", "окно", "яблоко", "улица", "книга", "лампа"],
}

# espeak-ng voices per language: the accents a speaker is drawn from.
_ACCENTS: dict[str, list[str]] = {
    "en": ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-029", "en-us-nyc"],
    "de": ["de"], "fr": ["fr", "fr-be", "fr-ch"], "es": ["es", "es-419"], "it": ["it"],
    "nl": ["nl"], "pt": ["pt", "pt-br"], "pl": ["pl"], "ru": ["ru", "ru-lv"],
}

# Voice variants (espeak-ng-data/voices/!v) that sound like people; robots, heavy
# echo and whisper are left out. The shift pool is disjoint from the main pool,
# so shift_test speakers have voice types no model trained here has heard.
_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt",
             "klatt2", "klatt3", "adam", "benjamin", "david", "edward", "mike2", "Alex",
             "Mike", "Andrea", "Annie", "anika", "belinda", "linda", "grandpa", "max",
             "paul", "robert", "rob", "antonio", "michel", "miguel", "Gene", "Nguyen",
             "shelby", "travis"]
_SHIFT_VARIANTS = ["m8", "f5", "klatt4", "edward2", "quincy", "aunty", "Alicia", "steph",
                   "Denis", "gustave", "grandma", "Diogo", "victor"]

# Speakers (train, val, test, shift_test) and repetitions of each keyword per
# speaker. English is big enough to pretrain on (BC-ResNet-8 reaches ~98% test
# accuracy); targets are few-shot transfers, small enough that training from
# scratch falls behind transfer from English.
_SOURCE_SPEAKERS, _SOURCE_REPS = (64, 10, 10, 10), 3
_TARGET_SPEAKERS, _TARGET_REPS = (16, 6, 8, 8), 2

# Rendering share of one worker interpreter; part of the config because it fixes
# the order in which espeak-ng speaks (see the module docstring).
_SPEAKERS_PER_STREAM = 24

_FEATURE_FILE = "{split}.safetensors"
_PROGRESS = "kws-synth-progress "  # a worker's stdout line: this prefix, then clips done
_MANIFEST = "manifest.json"

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_EE_OK = 0
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4
_ESPEAK_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


# ---------------------------------------------------------------------------------
# espeak-ng through ctypes


class _Espeak:
    """libespeak-ng initialised for synchronous retrieval into a Python buffer."""

    def __init__(self) -> None:
        import espeakng_loader

        lib_path = espeakng_loader.get_library_path()
        try:
            lib = ctypes.CDLL(lib_path)
            data_path = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as e:
            raise SwrError(f"cannot load espeak-ng from the espeakng-loader wheel ({e}); "
                           "reinstall it with: pip install --force-reinstall espeakng-loader"
                           ) from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if rate <= 0:
            raise SwrError(f"espeak-ng failed to initialise with its data at {data_path}; "
                           "reinstall espeakng-loader")
        self.lib = lib
        self.sample_rate = rate
        self._chunks: list[np.ndarray] = []
        # ctypes must keep the callback object alive as long as the library holds it.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, n: int, _events: Any) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
              volume: int, seed: int | None) -> np.ndarray:
        """16-bit samples at the native rate (22050 Hz)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise SwrError(f"espeak-ng has no voice {voice!r}; use a language code such as "
                           "'en' or 'de', optionally with a variant: 'en+m3'")
        # Parameters persist across calls and voice changes: every call sets them all.
        for param, value in ((_ESPEAK_RATE, rate), (_ESPEAK_PITCH, pitch),
                             (_ESPEAK_RANGE, pitch_range), (_ESPEAK_VOLUME, volume)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        if seed is not None:
            self.lib.espeak_ng_SetRandSeed(seed)
        self._chunks = []
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0,
                                    _ESPEAK_CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with code {err} on {text!r}")
        out = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        self._chunks = []
        return out


_ENGINE: _Espeak | None = None
_ENGINE_PID = -1
_ENGINE_LOCK = threading.Lock()  # espeak-ng is not thread-safe
_RESAMPLERS: dict[int, torchaudio.transforms.Resample] = {}


def _engine() -> _Espeak:
    """The process's espeak-ng, initialised once (again in a forked child)."""
    global _ENGINE, _ENGINE_PID
    if _ENGINE is None or _ENGINE_PID != os.getpid():
        _ENGINE = _Espeak()
        _ENGINE_PID = os.getpid()
    return _ENGINE


def synthesize(text: str, voice: str = "en", rate: int = 175, pitch: int = 50,
               pitch_range: int = 50, volume: int = 100, seed: int | None = None
               ) -> np.ndarray:
    """Speak ``text`` with espeak-ng; float32 mono samples in [-1, 1] at 16 kHz.

    ``voice`` is an espeak-ng voice name, optionally with a variant (``"en-us+f2"``);
    ``rate`` is in words per minute (80-450), ``pitch`` and ``pitch_range`` are 0-99
    (50 = the voice's own), ``volume`` 0-200. ``seed`` seeds the breath noise of
    breathy voices (espeak-ng seeds it from the clock otherwise). The output
    includes espeak-ng's short leading and trailing silences. espeak-ng also
    carries a little state from one utterance to the next, so within a process
    repeated calls can differ slightly; the same sequence of seeded calls in a
    fresh process gives the same audio.
    """
    for name, value, lo, hi in (("rate", rate, 80, 450), ("pitch", pitch, 0, 99),
                                ("pitch_range", pitch_range, 0, 99),
                                ("volume", volume, 0, 200)):
        if not lo <= value <= hi:
            raise SwrError(f"synthesize: {name}={value} is out of range; use {lo}..{hi}")
    with _ENGINE_LOCK:
        engine = _engine()
        raw = engine.synth(text, voice, rate, pitch, pitch_range, volume, seed)
    wav = torch.from_numpy(raw.astype(np.float32) / 32768.0)
    sr = engine.sample_rate
    if sr != SAMPLE_RATE:
        if sr not in _RESAMPLERS:  # the resampling kernel is worth computing once
            _RESAMPLERS[sr] = torchaudio.transforms.Resample(sr, SAMPLE_RATE)
        wav = _RESAMPLERS[sr](wav)
    return wav.numpy().astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------
# Generation config and speakers


def _check_lang(lang: str) -> None:
    if lang not in LANGUAGES:
        raise SwrError(f"unknown kws-synth language {lang!r}; known: {', '.join(LANGUAGES)}")


def _with_shift_test(speakers: tuple) -> tuple:
    """Speaker counts (train, val, test[, shift_test]) with shift_test as large as test
    when it is not given."""
    return speakers + (speakers[2],) if len(speakers) == 3 else speakers


def _estimate(lang: str, speakers: tuple[int, ...]) -> tuple[float, str]:
    """Bytes the task of ``speakers`` holds (log-mel float32 clips) and its clip count."""
    reps = _SOURCE_REPS if lang == SOURCE_LANG else _TARGET_REPS
    words = len(LANGUAGES.get(lang, LANGUAGES[SOURCE_LANG])) + 2  # + unknown, silence
    clips = sum(_with_shift_test(tuple(speakers))) * reps * words
    return clips * 40 * 101 * 4, f"{clips} clips"


#: ``kws-synth:<lang>?speakers=T,V,E[,S]``; 1000 speakers a split is 60x the default.
SPEAKERS = SpecOption("speakers", (3, 4), 1000, "speakers per split",
                      "speaker counts of train, val, test[, shift_test]", "16,24,24", _estimate)


def _config(lang: str, seed: int, speakers: Sequence[int] | None,
            reps: int | None) -> dict:
    """Everything that determines the generated data; its hash keys the cache."""
    _check_lang(lang)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SwrError(f"kws-synth seed must be a non-negative integer, got {seed!r}")
    if speakers is None:
        speakers = _SOURCE_SPEAKERS if lang == SOURCE_LANG else _TARGET_SPEAKERS
    # bounded before any clip is spoken (a Python caller's counts as a spec's)
    speakers = _with_shift_test(SPEAKERS.check(speakers, f"kws-synth:{lang}", lang))
    if reps is None:
        reps = _SOURCE_REPS if lang == SOURCE_LANG else _TARGET_REPS
    if not isinstance(reps, int) or reps < 1:
        raise SwrError(f"reps must be a positive integer, got {reps!r}")
    normal = {"snr_db": [5.0, 30.0], "reverb_p": 0.3, "rt60_s": [0.15, 0.6]}
    shift = {"snr_db": [-3.0, 8.0], "reverb_p": 0.6, "rt60_s": [0.3, 0.9]}
    return {
        "version": VERSION,
        "lang": lang,
        "seed": seed,
        "keywords": list(LANGUAGES[lang]),
        "fillers": list(_FILLERS[lang]),
        "accents": list(_ACCENTS[lang]),
        "variants": list(_VARIANTS),
        "shift_variants": list(_SHIFT_VARIANTS),
        "speakers": dict(zip(SPLITS, speakers)),
        "reps": reps,
        # espeak-ng parameters of a speaker, and their per-utterance jitter
        "voice": {"pitch": [20, 80], "range": [25, 90], "rate": [130, 220],
                  "jitter_pitch": 6, "jitter_range": 10, "jitter_rate": 0.1,
                  "punctuation": [".", "!", "?"]},
        "profiles": {"train": normal, "val": normal, "test": normal, "shift_test": shift},
        "level_dbfs": [-35.0, -15.0],
        "noise": {"white": 0.15, "pink": 0.25, "brown": 0.15, "hum": 0.1, "babble": 0.35},
        "babble": {"seconds": 12, "voices": 6},
        "features": {"sample_rate": SAMPLE_RATE, "clip_samples": CLIP_SAMPLES, "n_mels": 40,
                     "win_ms": 30.0, "hop_ms": 10.0, "dtype": "float16"},
        "speakers_per_stream": _SPEAKERS_PER_STREAM,
        "espeakng_loader": _espeak_version(),
    }


def _espeak_version() -> str:
    try:
        return metadata.version("espeakng-loader")
    except metadata.PackageNotFoundError:
        raise SwrError("kws-synth needs espeak-ng from the espeakng-loader wheel; "
                       "install it with: pip install espeakng-loader") from None


def _config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# What a random stream is for: the second part of the key given to _rng.
_STREAM_VOICE, _STREAM_CLIPS, _STREAM_BABBLE = 0, 1, 2


def _rng(cfg: dict, *keys: int) -> np.random.Generator:
    """A generator seeded from (seed, language, keys): independent of call order."""
    return np.random.default_rng([cfg["seed"], zlib.crc32(cfg["lang"].encode()), *keys])


def _draw_voice(rng: np.random.Generator, cfg: dict, variants: Sequence[str]) -> dict:
    v = cfg["voice"]
    return {"voice": f"{rng.choice(cfg['accents'])}+{rng.choice(variants)}",
            "pitch": int(rng.integers(v["pitch"][0], v["pitch"][1] + 1)),
            "range": int(rng.integers(v["range"][0], v["range"][1] + 1)),
            "rate": int(rng.integers(v["rate"][0], v["rate"][1] + 1))}


def _speakers(cfg: dict) -> list[dict]:
    """All speakers, split by split; ids are unique within the language."""
    out, sid = [], 0
    for split in SPLITS:
        variants = cfg["shift_variants"] if split == "shift_test" else cfg["variants"]
        for _ in range(cfg["speakers"][split]):
            out.append({"id": sid, "split": split,
                        **_draw_voice(_rng(cfg, _STREAM_VOICE, sid), cfg, variants)})
            sid += 1
    return out


# ---------------------------------------------------------------------------------
# Rendering (runs in worker interpreters)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)) + 1e-12))


def _trim(x: np.ndarray, rel: float = 0.02, margin: int = 160) -> np.ndarray:
    """Drop espeak-ng's leading/trailing silence, keeping 10 ms either side."""
    if x.size == 0:
        return x
    loud = np.flatnonzero(np.abs(x) > rel * np.abs(x).max())
    if loud.size == 0:
        return x
    return x[max(0, loud[0] - margin): loud[-1] + margin]


def _speak(spk: dict, text: str, rng: np.random.Generator, cfg: dict) -> np.ndarray:
    """One utterance of ``text`` by speaker ``spk`` with per-utterance jitter, trimmed."""
    v = cfg["voice"]
    pitch = int(np.clip(spk["pitch"] + rng.integers(-v["jitter_pitch"], v["jitter_pitch"] + 1),
                        0, 99))
    prange = int(np.clip(spk["range"] + rng.integers(-v["jitter_range"], v["jitter_range"] + 1),
                         0, 99))
    rate = int(np.clip(spk["rate"] * rng.uniform(1 - v["jitter_rate"], 1 + v["jitter_rate"]),
                       80, 450))
    punct = str(rng.choice(v["punctuation"]))
    wav = _trim(synthesize(text + punct, spk["voice"], rate=rate, pitch=pitch,
                           pitch_range=prange, seed=int(rng.integers(2**31 - 1)))
                .astype(np.float64))
    if wav.size < SAMPLE_RATE // 20 or not np.abs(wav).max() > 0:
        raise RuntimeError(f"espeak-ng produced no speech for {text!r} with voice "
                           f"{spk['voice']!r}")
    return wav


def _channel(word: np.ndarray, rng: np.random.Generator, profile: dict) -> np.ndarray:
    """Microphone colouration (tilt, band limits) and optional room reverb."""
    ir = None
    if rng.random() < profile["reverb_p"]:
        rt60 = rng.uniform(*profile["rt60_s"])
        t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        tail = rng.standard_normal(t.size) * np.exp(-6.908 * t / rt60)  # -60 dB at rt60
        # reverberant energy 3-12 dB below the direct path
        ir = tail * 10 ** (rng.uniform(-12.0, -3.0) / 20) / (_rms(tail) * np.sqrt(t.size))
        ir[0] = 1.0  # direct path
    n = word.size + (0 if ir is None else ir.size - 1)
    nfft = 1 << (n - 1).bit_length()
    spec = np.fft.rfft(word, nfft)
    if ir is not None:
        spec *= np.fft.rfft(ir, nfft)
    f = np.maximum(np.fft.rfftfreq(nfft, 1 / SAMPLE_RATE), 1.0)
    tilt_db_per_octave = rng.uniform(-3.0, 3.0)
    gain = (f / 1000.0) ** (tilt_db_per_octave / 6.02)
    gain /= np.sqrt(1 + (f / rng.uniform(3500.0, 8000.0)) ** 8)  # 4th-order low-pass
    gain /= np.sqrt(1 + (rng.uniform(50.0, 300.0) / f) ** 4)  # 2nd-order high-pass
    return np.fft.irfft(spec * gain, nfft)[:n]


def _coloured(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with a 1/f^alpha power spectrum (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    return np.fft.irfft(spec * f ** (-alpha / 2), n)


def _noise(rng: np.random.Generator, cfg: dict, babble: np.ndarray,
           n: int = CLIP_SAMPLES) -> np.ndarray:
    """Unit-RMS background noise of a random kind."""
    kinds = list(cfg["noise"])
    kind = kinds[rng.choice(len(kinds), p=np.array(list(cfg["noise"].values())))]
    if kind in ("white", "pink", "brown"):
        alpha = {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind] + rng.uniform(-0.25, 0.25)
        x = _coloured(n, alpha, rng)
    elif kind == "hum":
        f0 = rng.choice([50.0, 60.0]) * rng.uniform(0.98, 1.02)
        t = np.arange(n) / SAMPLE_RATE
        x = sum(rng.uniform(0.1, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3))
                for k in range(1, 11))
        floor = _coloured(n, 1.0, rng)
        x = x / _rms(x) + 0.2 * floor / _rms(floor)
    else:
        start = int(rng.integers(0, babble.size - n))
        x = babble[start:start + n].copy()
    x = x / _rms(x)
    # a faint white floor, as any microphone has
    return x + 0.03 * rng.standard_normal(n)


def _babble_bank(cfg: dict) -> np.ndarray:
    """Seconds of overlapping speech of filler words by several voices (unit RMS)."""
    rng = _rng(cfg, _STREAM_BABBLE)
    n = cfg["babble"]["seconds"] * SAMPLE_RATE
    bank = np.zeros(n)
    for _ in range(cfg["babble"]["voices"]):
        spk = _draw_voice(rng, cfg, cfg["variants"])
        pos = int(rng.integers(0, SAMPLE_RATE // 2))
        while pos < n:
            word = _speak(spk, str(rng.choice(cfg["fillers"])), rng, cfg)
            seg = word[: n - pos] / _rms(word)
            bank[pos:pos + seg.size] += seg
            pos += word.size + int(rng.integers(SAMPLE_RATE // 50, SAMPLE_RATE // 4))
    return bank / _rms(bank)


def _render_speaker(spk: dict, cfg: dict, babble: np.ndarray
                    ) -> tuple[list[np.ndarray], list[int], list[str]]:
    """All clips of one speaker: each keyword ``reps`` times, ``reps`` unknown words and
    ``reps`` silences, every clip through the same augmentation."""
    rng = _rng(cfg, _STREAM_CLIPS, spk["id"])
    reps, keywords, fillers = cfg["reps"], cfg["keywords"], cfg["fillers"]
    items: list[tuple[int, str | None]] = [(k, w) for k, w in enumerate(keywords)
                                              for _ in range(reps)]
    picks = rng.choice(len(fillers), size=reps, replace=reps > len(fillers))
    items += [(len(keywords), fillers[i]) for i in picks]
    items += [(len(keywords) + 1, None)] * reps
    profile = cfg["profiles"][spk["split"]]
    lo, hi = cfg["level_dbfs"]
    clips, labels, texts = [], [], []
    for label, text in items:
        level = 10 ** (rng.uniform(lo, hi) / 20)
        noise_rms = level / 10 ** (rng.uniform(*profile["snr_db"]) / 20)
        if text is None:
            clip = np.zeros(CLIP_SAMPLES)
        else:
            word = _channel(_speak(spk, text, rng, cfg), rng, profile)
            word *= level / _rms(word)
            offset = int(rng.integers(0, max(1, CLIP_SAMPLES - word.size + 1)))
            # an over-long word (slow speaker, reverb tail) is centre-cropped
            clip = fix_length(torch.from_numpy(np.pad(word, (offset, 0)))).numpy()
        clip = clip + noise_rms * _noise(rng, cfg, babble)
        clips.append(np.clip(clip, -1.0, 1.0).astype(np.float32))
        labels.append(label)
        texts.append(text or "")
    return clips, labels, texts


def _render_stream(job: dict, report: Callable[[int], None]) -> None:
    """Render one worker's speakers in order and save features (and WAVs) to disk."""
    cfg, out = job["config"], Path(job["out"])
    feat = cfg["features"]
    logmel = LogMel(n_mels=feat["n_mels"], sample_rate=feat["sample_rate"],
                    win_ms=feat["win_ms"], hop_ms=feat["hop_ms"])
    babble = _babble_bank(cfg)
    xs, ys, spks, clips_meta = [], [], [], []
    for spk in job["speakers"]:
        clips, labels, texts = _render_speaker(spk, cfg, babble)
        xs.append(logmel(torch.from_numpy(np.stack(clips))).to(getattr(torch, feat["dtype"])))
        ys += labels
        spks += [spk["id"]] * len(labels)
        if job["keep_wav"]:
            for i, (clip, label, text) in enumerate(zip(clips, labels, texts)):
                rel = f"wav/{spk['split']}/{spk['id']:04d}_{i:03d}.wav"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                write_wav(out / rel, clip)
                clips_meta.append({"file": rel, "label": label, "speaker": spk["id"],
                                   "text": text})
        report(len(labels))
    torch.save({"x": torch.cat(xs), "y": torch.tensor(ys, dtype=torch.int64),
                "speaker": torch.tensor(spks, dtype=torch.int64), "clips": clips_meta},
               job["result"])


def _worker_main(job_path: str) -> None:
    """Entry point of a worker interpreter: render the job, print progress lines."""
    torch.set_num_threads(1)  # parallelism comes from several workers
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))

    def report(n: int) -> None:
        print(f"{_PROGRESS}{n}", flush=True)

    _render_stream(job, report)


# ---------------------------------------------------------------------------------
# Orchestration, cache


def _cache_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    return cache_dir("kws-synth")


@contextlib.contextmanager
def _locked(root: Path, lang: str) -> Iterator[None]:
    """Hold an exclusive lock on ``root/.<lang>.lock`` (no-op where flock is missing)."""
    root.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(root / f".{lang}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Workers:
    """Worker interpreters rendering shares of a suite, killed together on failure."""

    def __init__(self, report: Callable[[int], None]):
        self.report = report
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.stopped = False

    def run(self, job_path: Path) -> None:
        # A fresh interpreter per share: espeak-ng state starts clean (see the module
        # doc), and unlike multiprocessing's spawn it never re-runs the caller's
        # __main__.
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        code = f"import sys; from {__name__} import _worker_main; _worker_main(sys.argv[1])"
        err_path = job_path.with_suffix(".err")
        with open(err_path, "wb") as err:
            with self.lock:
                if self.stopped:
                    return
                proc = subprocess.Popen([sys.executable, "-c", code, str(job_path)],
                                        env=env, stdout=subprocess.PIPE, stderr=err,
                                        text=True)
                self.procs.append(proc)
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(_PROGRESS):
                    with self.lock:
                        self.report(int(line[len(_PROGRESS):]))
            rc = proc.wait()
        if rc != 0 and not self.stopped:
            tail = err_path.read_text(errors="replace").strip().splitlines()[-20:]
            raise RuntimeError(f"kws-synth worker failed (exit {rc}):\n" + "\n".join(tail))

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()


def _render_all(cfg: dict, speakers: list[dict], work: Path, keep_wav: bool,
                progress: bool, workers: int | None) -> list[dict]:
    """Render every speaker in worker interpreters; results in speaker order."""
    n_streams = -(-len(speakers) // cfg["speakers_per_stream"])
    bounds = [round(i * len(speakers) / n_streams) for i in range(n_streams + 1)]
    jobs = []
    for i in range(n_streams):
        job = {"config": cfg, "speakers": speakers[bounds[i]:bounds[i + 1]],
               "out": str(work), "keep_wav": keep_wav, "result": str(work / f"stream{i}.pt")}
        path = work / f"stream{i}.json"
        path.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
        jobs.append(path)
    total = len(speakers) * cfg["reps"] * (len(cfg["keywords"]) + 2)
    with progress_bar(total, f"kws-synth:{cfg['lang']}", "clip",
                      disable=not progress) as bar:
        runner = _Workers(bar.update)
        pool = ThreadPoolExecutor(max_workers=workers or min(n_streams, os.cpu_count() or 1))
        try:
            for future in [pool.submit(runner.run, job) for job in jobs]:
                future.result()
        except BaseException:  # a failed worker or Ctrl-C: stop the others too
            runner.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [torch.load(work / f"stream{i}.pt", weights_only=True) for i in range(n_streams)]


def _cache_ok(path: Path, cfg: dict, keep_wav: bool) -> bool:
    try:
        manifest = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return (isinstance(manifest, dict) and manifest.get("config_hash") == _config_hash(cfg)
            and (manifest.get("keep_wav") or not keep_wav)
            and all((path / _FEATURE_FILE.format(split=s)).is_file() for s in SPLITS))


def _generate_locked(cfg: dict, root: Path, keep_wav: bool, progress: bool,
                     workers: int | None) -> Path:
    lang = cfg["lang"]
    for stale in list(root.glob(f".{lang}.tmp-*")) + list(root.glob(f".{lang}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed generation
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{lang}.tmp-", dir=root))
    try:
        speakers = _speakers(cfg)
        work = tmp / "work"
        work.mkdir()
        results = _render_all(cfg, speakers, work, keep_wav, progress, workers)
        x = torch.cat([r["x"] for r in results])
        y = torch.cat([r["y"] for r in results])
        spk = torch.cat([r["speaker"] for r in results])
        clips = [c for r in results for c in r["clips"]]
        if keep_wav:
            shutil.move(str(work / "wav"), str(tmp / "wav"))
        shutil.rmtree(work)
        split_of = torch.tensor([SPLITS.index(s["split"]) for s in speakers])[spk]
        class_names = cfg["keywords"] + [UNKNOWN, SILENCE]
        splits = {}
        for i, split in enumerate(SPLITS):
            sel = split_of == i
            fname = _FEATURE_FILE.format(split=split)
            save_file({"x": x[sel].contiguous(), "y": y[sel].contiguous(),
                       "speaker": spk[sel].contiguous()}, str(tmp / fname),
                      metadata={"task": f"kws-synth:{lang}", "split": split})
            ids = {s["id"] for s in speakers if s["split"] == split}
            splits[split] = {
                "file": fname,
                "num_clips": int(sel.sum()),
                "class_counts": torch.bincount(y[sel], minlength=len(class_names)).tolist(),
                "speakers": [s for s in speakers if s["split"] == split],
                **({"clips": [c for c in clips if c["speaker"] in ids]} if keep_wav else {}),
            }
        write_json(tmp / _MANIFEST, {
            "task": f"kws-synth:{lang}",
            "version": VERSION,
            "config_hash": _config_hash(cfg),
            "seed": cfg["seed"],
            "class_names": class_names,
            "counts": {s: splits[s]["num_clips"] for s in SPLITS},
            "input_shape": [1, cfg["features"]["n_mels"], int(x.shape[-1])],
            "keep_wav": keep_wav,
            "generation_seconds": round(time.perf_counter() - started, 2),
            "config": cfg,
            "splits": splits,
        })
        final = root / lang
        if final.exists():  # move the old cache aside first: rename cannot replace a folder
            old = root / f".{lang}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def generate(lang: str, root: str | os.PathLike | None = None, seed: int = 0, *,
             speakers: Sequence[int] | None = None, reps: int | None = None,
             keep_wav: bool = False, progress: bool = True,
             workers: int | None = None) -> Path:
    """(Re)generate the ``kws-synth:<lang>`` cache and return its folder.

    ``speakers`` = (train, val, test[, shift_test]) speaker counts and ``reps`` =
    utterances of each keyword per speaker (also the number of unknown words and of
    silences per speaker) override the defaults, e.g. for a miniature suite.
    ``keep_wav`` also writes every clip as a 16 kHz WAV. ``workers`` caps the
    parallel worker processes (default: one per CPU); it does not change the data.
    """
    cfg = _config(lang, seed, speakers, reps)
    root = _cache_root(root)
    with _locked(root, lang):
        return _generate_locked(cfg, root, keep_wav, progress, workers)


def _read_cache(path: Path) -> tuple[dict, dict] | None:
    """``(manifest, {split: tensors})`` of a cache folder, or None if any part is damaged.

    Only the fixed feature files are read (safetensors: no code runs); file names
    listed in the manifest are never followed.
    """
    from safetensors import SafetensorError

    try:
        manifest = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
        data = {s: load_file(str(path / _FEATURE_FILE.format(split=s))) for s in SPLITS}
        ok = (isinstance(manifest["class_names"], list)
              and all(isinstance(c, str) for c in manifest["class_names"])
              and len(manifest["input_shape"]) == 3
              and all(isinstance(n, int) for n in manifest["input_shape"])
              and all(isinstance(manifest["splits"][s]["speakers"], list)
                      and isinstance(manifest["counts"][s], int) for s in SPLITS)
              and all({"x", "y"} <= d.keys() and len(d["x"]) == len(d["y"])
                      == manifest["counts"][s] for s, d in data.items()))
    except (OSError, ValueError, RecursionError, SafetensorError, KeyError, TypeError,
            AttributeError):
        return None
    return (manifest, data) if ok else None


def load_kws_synth(lang: str, root: str | os.PathLike | None = None, seed: int = 0,
                   progress: bool = True, *, speakers: Sequence[int] | None = None,
                   reps: int | None = None, keep_wav: bool = False,
                   workers: int | None = None) -> Task:
    """The ``kws-synth:<lang>`` task, generated on first use and cached.

    Splits are in-memory log-mel tensors ``(N, 1, 40, 101)``; ``train_transform``
    is SpecAugment. Classes: the language's 10 keywords, ``_unknown_``,
    ``_silence_``. By default English has 64/10/10/10 speakers saying each word 3
    times (2304/360/360/360 clips in train/val/test/shift_test), a target language
    16/6/8/8 speakers, 2 times (384/144/192/192 clips). The cache under ``root``
    (default ``$SWR_CACHE/kws-synth`` or ``~/.cache/swr/kws-synth``) is reused when
    its manifest matches this call's parameters and regenerated otherwise; see
    :func:`generate` for the keyword arguments. An unknown language raises
    :class:`~swr.errors.SwrError`.
    """
    cfg = _config(lang, seed, speakers, reps)
    root = _cache_root(root)
    with _locked(root, lang):
        path = root / lang
        cached = _read_cache(path) if _cache_ok(path, cfg, keep_wav) else None
        if cached is None:  # missing, stale or damaged: (re)generate
            _generate_locked(cfg, root, keep_wav, progress, workers)
            cached = _read_cache(path)
            if cached is None:
                raise SwrError(f"kws-synth cache {path} is unreadable right after writing it; "
                               f"check the disk, or set SWR_CACHE to another folder")
    manifest, data = cached
    ds = {s: tensor_split(d["x"], d["y"]) for s, d in data.items()}
    return Task(
        id=f"kws-synth:{lang}", modality="audio", class_names=manifest["class_names"],
        train=ds["train"], val=ds["val"], test=ds["test"], shift_test=ds["shift_test"],
        input_shape=tuple(manifest["input_shape"]), train_transform=SpecAugment(),
        info={"language": lang, "source": lang == SOURCE_LANG, "seed": seed,
              "version": VERSION, "cache": str(path),
              "speakers": {s: len(manifest["splits"][s]["speakers"]) for s in SPLITS},
              "clips": dict(manifest["counts"])})


def load_kws_synth_spec(rest: str, seed: int = 0, **kwargs: Any) -> Task:
    """The task of a ``kws-synth:<rest>`` spec: ``<lang>`` or ``<lang>?speakers=T,V,E[,S]``.

    A speaker-count variant is cached under its own root
    (``<cache>/speakers-T-V-E-S/<lang>``), so it never replaces the default-size task's
    cache, and its task id keeps the modifier (``kws-synth:ru?speakers=16,24,24``)."""
    lang, options = parse_options(f"kws-synth:{rest}", rest, {"speakers": SPEAKERS})
    if "speakers" not in options:
        return load_kws_synth(lang, seed=seed, **kwargs)
    parts = [str(n) for n in options["speakers"]]
    speakers = _with_shift_test(options["speakers"])
    root = _cache_root(kwargs.pop("root", None)) / ("speakers-" + "-".join(map(str, speakers)))
    task = load_kws_synth(lang, root=root, seed=seed, speakers=speakers, **kwargs)
    return dataclasses.replace(task, id=f"kws-synth:{lang}?speakers={','.join(parts)}")
