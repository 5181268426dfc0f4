"""RayVecEnv against SB3's in-process VecEnv, and MaskablePPO search on the synthetic env."""

from __future__ import annotations

import os

import socket
import sys

import gymnasium as gym
import numpy as np
import pytest
import ray
import ray.cloudpickle
from swr.envs import LayerSelectEnv, make_synthetic_env
from swr import parallel as ray_utils
from swr.policies.ppo import ppo_select, train_ppo
from swr.policies.ray_vecenv import RayVecEnv, SyncVecEnv

from swr.errors import SwrError

N_LAYERS = 8

# Pytest imports this file as a top-level module that Ray workers cannot import;
# ship its functions (the env factories) by value instead of by reference.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def env_a() -> LayerSelectEnv:
    return make_synthetic_env(n_layers=N_LAYERS, seed=0)


def env_b() -> LayerSelectEnv:
    return make_synthetic_env(n_layers=N_LAYERS, seed=1)


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


@pytest.fixture(params=["sync", pytest.param("ray", marks=pytest.mark.ray)])
def vec_cls(request):
    if request.param == "ray":
        request.getfixturevalue("ray_session")
        return RayVecEnv
    return SyncVecEnv


def test_vecenv_contract(vec_cls):
    # Three envs on two CPUs: the Ray actors must still all be scheduled.
    venv = vec_cls([env_a, env_b, env_a])
    try:
        obs_dim = env_a().observation_space.shape[0]
        venv.seed(5)
        obs = venv.reset()
        assert obs.shape == (3, obs_dim) and obs.dtype == np.float32
        assert venv.get_attr("np_random_seed") == [5, 6, 7]
        assert venv.reset_infos[0]["budget"] == env_a().budget

        # Step one episode with a reference env alongside: always reparametrize.
        ref = env_a()
        ref_obs, _ = ref.reset()
        np.testing.assert_array_equal(obs[0], ref_obs)
        actions = np.ones(3, dtype=np.int64)
        for t in range(N_LAYERS):
            obs, rewards, dones, infos = venv.step(actions)
            ref_obs, ref_reward, terminated, _, _ = ref.step(1)
            assert rewards.shape == (3,) and dones.shape == (3,)
            assert bool(dones[0]) == terminated == (t == N_LAYERS - 1)
            assert infos[0]["TimeLimit.truncated"] is False
        # Auto-reset: the episode's last observation is kept, the new first one returned.
        np.testing.assert_array_equal(infos[0]["terminal_observation"], ref_obs)
        np.testing.assert_array_equal(obs[0], ref.reset()[0])
        assert rewards[0] == pytest.approx(ref_reward) and infos[0]["score"] == pytest.approx(ref_reward)

        assert venv.get_attr("budget") == [env_a().budget, env_b().budget, env_a().budget]
        venv.set_attr("budget", 123, indices=[1])
        assert venv.get_attr("budget", indices=[0, 1]) == [env_a().budget, 123]
        masks = venv.env_method("action_masks", indices=2)
        assert len(masks) == 1 and list(masks[0]) == list(ref.action_masks())
        venv.set_attr("_left", 0, indices=[1])  # no budget left: masks must follow
        assert [list(m) for m in venv.env_method("action_masks")] == [
            list(ref.action_masks()), [True, False], list(ref.action_masks())]
        assert venv.has_attr("action_masks") and not venv.has_attr("no_such_attribute")
        with pytest.raises(AttributeError):
            venv.get_attr("no_such_attribute")
        assert venv.env_is_wrapped(gym.wrappers.TimeLimit) == [False] * 3
        assert venv.get_attr("render_mode") == [None] * 3
    finally:
        venv.close()


@pytest.mark.ray
def test_ray_and_sync_trajectories_match(ray_session):
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, size=(3 * N_LAYERS, 2))  # several episodes, forbidden actions too
    runs = []
    for cls in (SyncVecEnv, RayVecEnv):
        venv = cls([env_a, env_b])
        venv.seed(3)
        steps = [(venv.reset(), None, None, None)]
        masks = [np.stack(venv.env_method("action_masks"))]
        for a in actions:
            steps.append(venv.step(a))
            masks.append(np.stack(venv.env_method("action_masks")))
        venv.close()
        runs.append((steps, masks))
    (sync_steps, sync_masks), (ray_steps, ray_masks) = runs
    np.testing.assert_array_equal(np.stack(sync_masks), np.stack(ray_masks))
    for (o1, r1, d1, i1), (o2, r2, d2, i2) in zip(sync_steps, ray_steps):
        np.testing.assert_array_equal(o1, o2)
        assert o1.dtype == o2.dtype
        if r1 is None:
            continue
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(d1, d2)
        for a, b in zip(i1, i2):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_equal(a[k], b[k])


@pytest.mark.ray
def test_maskable_ppo_search_respects_budget(ray_session):
    records: list[dict] = []
    kwargs = {"seed": 0, "n_steps": 32, "batch_size": 64, "progress": False}
    _, result = ppo_select([env_a, env_a], 256, use_ray=True, log=records.append, **kwargs)

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

    # Same seed in-process: RayVecEnv is a drop-in, so training sees the very same episodes.
    # Without a log folder nothing is written anywhere (SB3's default logger would leave
    # an empty SB3-<date> folder in the temp dir).
    import glob
    import tempfile

    litter = set(glob.glob(os.path.join(tempfile.gettempdir(), "SB3-*")))
    sync_records: list[dict] = []
    _, sync_best = train_ppo([env_a, env_a], 256, use_ray=False, log=sync_records.append, **kwargs)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "SB3-*"))) == litter
    assert sync_records == [r for r in records if r["source"] == "rollout"]
    assert sync_best.evaluations == len(sync_records)


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
