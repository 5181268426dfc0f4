import os

import pytest
import torch

# Two cores: keep each test process to few threads so parallel pieces do not thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated suites and pretrained checkpoints go to a per-session temp cache."""
    monkeypatch.setenv("SWR_CACHE", str(tmp_path_factory.getbasetemp() / "swr-cache"))
