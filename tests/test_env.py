import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import swr.envs  # noqa: F401  (registers the ids)
from swr.envs import CachedEvaluator, LayerSelectEnv, SyntheticEvaluator, layer_features, make_synthetic_env


def test_gymnasium_and_sb3_checkers_pass():
    check_env(gym.make("swr/LayerSelectSynthetic-v0").unwrapped, skip_render_check=False)
    sb3_check_env(make_synthetic_env(n_layers=9, seed=3))


def test_registered_env_with_explicit_arguments():
    costs = [10, 20, 30, 40]
    stats = [{"name": f"l{i}", "kind": "linear", "cost": c, "taylor": 0.1 * i} for i, c in enumerate(costs)]
    ev = SyntheticEvaluator(costs, seed=1, names=[s["name"] for s in stats])
    env = gym.make("swr/LayerSelect-v0", features=layer_features(stats), costs=costs, budget=50,
                   evaluator=ev)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info["budget"] == 50


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), actions=st.lists(st.integers(0, 1), min_size=12, max_size=12),
       budget_fraction=st.floats(0.01, 1.0))
def test_budget_never_exceeded_even_with_unmasked_actions(seed, actions, budget_fraction):
    env = make_synthetic_env(n_layers=12, budget_fraction=budget_fraction, seed=seed)
    env.reset(seed=seed)
    spent = 0
    for t, a in enumerate(actions):
        mask = env.action_masks()
        assert mask[0]  # freezing is always allowed
        assert mask[1] == (env.costs[t] <= env.budget - spent)
        _, reward, terminated, truncated, info = env.step(a)
        if a == 1 and mask[1]:
            spent += int(env.costs[t])
        assert spent <= env.budget
        if not terminated:
            assert reward == 0.0
    assert terminated and not truncated
    assert info["cost"] == spent <= env.budget
    assert 0.0 - 1.0 <= reward <= 1.0


def test_evaluations_are_cached_by_selection():
    inner = SyntheticEvaluator([5, 5, 5], seed=0)
    ev = CachedEvaluator(inner)
    a = ev(["layer0", "layer2"])
    b = ev(("layer2", "layer0", "layer2"))  # same selection, other order, duplicate
    assert a == b and inner.calls == 1 and ev.hits == 1 and ev.evaluations == 1
    env = LayerSelectEnv(np.zeros((3, 4), np.float32), [5, 5, 5], 15, ev)
    for _ in range(2):
        env.reset()
        for _ in range(3):
            env.step(1)
    assert inner.calls == 2  # the all-open selection once, reused the second episode


def test_bad_actions_and_overrun_are_errors():
    env = make_synthetic_env(n_layers=3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(2)
    for _ in range(3):
        env.step(0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
