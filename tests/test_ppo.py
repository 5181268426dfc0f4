"""MaskablePPO search on the synthetic env, and the Ray setup the scoring pool uses."""

from __future__ import annotations

import glob
import os
import socket
import tempfile

import pytest
import ray
from swr.envs import LayerSelectEnv, make_synthetic_env
from swr.errors import SwrError
from swr.policies import ray_setup as ray_utils
from swr.policies.ppo import ppo_select, train_ppo

N_LAYERS = 8


def env_a() -> LayerSelectEnv:
    return make_synthetic_env(n_layers=N_LAYERS, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (startup takes seconds)."""
    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=100 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def test_maskable_ppo_search_respects_budget():
    records: list[dict] = []
    kwargs = {"seed": 0, "n_steps": 32, "batch_size": 64, "progress": False}
    # without a log folder nothing is written anywhere (SB3's default logger would leave
    # an empty SB3-<date> folder in the temp dir)
    litter = set(glob.glob(os.path.join(tempfile.gettempdir(), "SB3-*")))
    _, result = ppo_select([env_a, env_a], 256, log=records.append, **kwargs)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "SB3-*"))) == litter

    env = env_a()
    cost_of = dict(zip(env.names, env.costs))
    assert records and result.evaluations == len(records)
    for r in records:
        assert r["cost"] == sum(cost_of[n] for n in r["selection"]) <= env.budget
    assert result.masked_actions == 0
    assert records[-1]["source"] == "deterministic"
    assert 0 < result.evaluator_calls <= result.evaluations
    assert result.score == max(r["score"] for r in records)
    assert result.score >= env.evaluator(())  # selecting nothing

    # the same seed without the final rollout sees the very same training episodes
    plain: list[dict] = []
    _, best = train_ppo([env_a, env_a], 256, log=plain.append, **kwargs)
    assert plain == [r for r in records if r["source"] == "rollout"]
    assert best.evaluations == len(plain)


def test_init_ray_unreachable_cluster_is_one_clear_line(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(SwrError, match=rf"cannot reach Ray cluster at 127.0.0.1:{port}.*ray start --head"):
        ray_utils.init_ray(address=f"127.0.0.1:{port}")


@pytest.mark.ray
def test_ray_utils_leave_a_running_instance_alone(ray_session):
    ray_utils.init_ray()  # already running: nothing to do
    ray_utils.shutdown_ray()  # not started by init_ray: must not stop it
    assert ray.is_initialized()
    assert ray_utils.worker_threads(2) == 1  # two CPUs in the test instance
    assert ray_utils.worker_threads(100) == 1
