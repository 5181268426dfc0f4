import pytest
import torch

# Test models are tiny: one intra-op thread is fastest, and it leaves the other core to
# Ray workers started by the tests (two threads on a busy 2-core box thrash).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated suites and pretrained checkpoints go to a per-session temp cache."""
    monkeypatch.setenv("SWR_CACHE", str(tmp_path_factory.getbasetemp() / "swr-cache"))
