"""The install itself: the pinned torch trio loads its native libraries together.

Runs first (file name) so a broken environment shows up as one clear failure here
rather than as dozens of unrelated ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from swr import native
import swr.app.cli as cli
from swr.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_native_libraries_load():
    assert native.native_problems() == [], native.environment_error()


def test_trio_pinned_exactly_and_installed_as_pinned():
    text = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"(torch|torchvision|torchaudio)==([0-9.]+)"', text))
    assert set(native.TRIO) == set(pins), f"pin {native.TRIO} exactly in pyproject.toml"
    installed = native.installed_versions()
    for name in native.TRIO:
        # local version labels (+cpu, +cu130) are the build, not the release
        assert installed[name].split("+")[0] == pins[name], (name, installed[name], pins[name])
    assert native.pinned_versions() == {n: pins[n] for n in native.TRIO}


def test_swr_check_reports_ok(capsys):
    assert main(["check"]) == 0
    assert "ok" in capsys.readouterr().out


def _clash(monkeypatch):
    def broken():
        raise OSError("Could not load this library: /x/torchaudio/lib/libtorchaudio.so: "
                      "undefined symbol: torch_exception_get_what_without_backtrace")

    monkeypatch.setitem(native._CHECKS, "torchaudio", broken)


def test_clash_is_one_line_exit_1_naming_packages_and_fix(monkeypatch, capsys):
    _clash(monkeypatch)
    assert main(["check"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "torchaudio" in err and "undefined symbol: torch_exception" in err
    pins = native.pinned_versions()
    assert f"pip install --force-reinstall torch=={pins['torch']}" in err
    assert f"torchaudio=={pins['torchaudio']}" in err


def test_library_error_during_a_command_is_not_bad_input(monkeypatch, capsys):
    """An OSError from a native library used to exit 2 ("bad input"); it is a broken install."""
    _clash(monkeypatch)

    def run_that_loads_torchaudio(args):
        raise OSError("Could not load this library: libtorchaudio.so")

    add_args, _, help = cli.COMMANDS["inspect"]
    monkeypatch.setitem(cli.COMMANDS, "inspect", (add_args, run_that_loads_torchaudio, help))
    assert main(["inspect", "--backbone", "bcresnet-1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken install" in err


@pytest.mark.slow
def test_broken_torchaudio_in_a_real_process(tmp_path):
    """A torchaudio whose library fails to load, first on the path: `swr check` says so, exit 1."""
    fake = tmp_path / "torchaudio"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise OSError('Could not load this library: libtorchaudio.so: "
        "undefined symbol: torch_exception_get_what_without_backtrace')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "swr.app.cli", "check"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "torchaudio" in lines[0] and "--force-reinstall" in lines[0]
