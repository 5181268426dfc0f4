"""Checking that the native libraries swr needs load together.

torch, torchvision and torchaudio ship compiled libraries built against one another;
a mismatched trio installs without complaint and fails only when a library loads
(``undefined symbol`` in ``libtorchaudio.so``). That is a broken environment, not bad
input: :func:`native_problems` names the packages that clash and the command that
reinstalls the pinned trio, and the CLI reports it in one line with exit status 1.
"""

from __future__ import annotations

from importlib import metadata

#: The packages whose native libraries must load together, in the order they depend.
TRIO = ("torch", "torchvision", "torchaudio")


def _load_torchaudio() -> None:
    import torchaudio._extension  # noqa: F401  (loads libtorchaudio and _torchaudio)
    import torchaudio.functional as AF
    import torch

    AF.resample(torch.zeros(1, 160), 16000, 8000)


def _load_torchvision() -> None:
    import torch
    import torchvision

    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


#: What each package must be able to do; each loads its native library.
_CHECKS = {"torchvision": _load_torchvision, "torchaudio": _load_torchaudio}


def _load_soundfile() -> None:
    import io

    import numpy as np
    import soundfile as sf  # loads libsndfile: every audio file swr reads goes through it

    buf = io.BytesIO()
    sf.write(buf, np.zeros(160, dtype=np.float32), 16000, format="WAV")
    buf.seek(0)
    sf.read(buf)


def _load_pillow() -> None:
    from PIL import Image  # loads PIL's _imaging: every image file swr reads goes through it

    Image.new("RGB", (2, 2)).convert("L")


def _load_safetensors() -> None:
    import safetensors._safetensors_rust  # noqa: F401  (every weights and delta file)


#: The other native libraries swr loads, outside the trio: what each must be able to
#: do, and how to put it back when it cannot.
OTHER_CHECKS = {
    "soundfile": (_load_soundfile, "install the libsndfile system library (e.g. apt-get "
                  "install libsndfile1) or reinstall it: pip install --force-reinstall soundfile"),
    "pillow": (_load_pillow, "reinstall it: pip install --force-reinstall pillow"),
    "safetensors": (_load_safetensors, "reinstall it: pip install --force-reinstall safetensors"),
}


def installed_versions() -> dict[str, str]:
    """The installed version of each package of the trio (``"missing"`` if absent)."""
    out = {}
    for name in TRIO:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def pinned_versions() -> dict[str, str]:
    """The exact versions swr's own metadata pins for the trio (empty if not installed)."""
    try:
        requires = metadata.requires("swr") or []
    except metadata.PackageNotFoundError:
        return {}
    pins = {}
    for req in requires:
        name, sep, version = req.partition("==")
        name = name.strip().lower()
        if sep and name in TRIO:
            pins[name] = version.split(";")[0].strip()
    return pins


def reinstall_command() -> str:
    """The pip command that puts the pinned trio back."""
    pins = pinned_versions()
    spec = " ".join(f"{n}=={pins[n]}" for n in TRIO if n in pins) or " ".join(TRIO)
    return f"pip install --force-reinstall {spec}"


def native_problems() -> list[str]:
    """One line per package of the trio whose native library does not load (empty: all fine)."""
    problems = []
    versions = installed_versions()
    try:
        import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return [f"torch {versions['torch']} does not load ({_reason(e)})"]
    for name, check in _CHECKS.items():
        try:
            check()
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name} {versions[name]} does not load with torch "
                            f"{versions['torch']} ({_reason(e)})")
    return problems


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    marker = "undefined symbol"
    if marker in text:  # the symbol names the clash; the path before it does not
        return text[text.index(marker):]
    return text[:200] or type(e).__name__


def other_problems() -> list[str]:
    """One line per native library outside the trio (:data:`OTHER_CHECKS`) that does not
    load, each with how to put it back (empty: all fine)."""
    problems = []
    for name, (check, fix) in OTHER_CHECKS.items():
        try:
            check()
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = "missing"
            problems.append(f"{name} {version} does not load ({_reason(e)}); {fix}")
    return problems


def environment_error() -> str | None:
    """The one line that reports a broken install, or None when every native library
    swr uses loads (the trio together, soundfile's libsndfile, Pillow, safetensors)."""
    problems = native_problems()
    others = other_problems()
    if not problems and not others:
        return None
    line = "broken install: "
    if problems:
        pins = pinned_versions()
        wanted = ", ".join(f"{n} {pins[n]}" for n in TRIO if n in pins)
        line += ("; ".join(problems) + (f"; swr needs {wanted} together" if wanted else "")
                 + f"; reinstall them with: {reinstall_command()}" + ("; " if others else ""))
    return line + "; ".join(others)
