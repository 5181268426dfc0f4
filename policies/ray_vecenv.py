"""A Stable-Baselines3 ``VecEnv`` whose environments live in Ray actors.

:class:`RayVecEnv` follows SB3's ``SubprocVecEnv`` call for call (auto-reset with
``terminal_observation``, ``TimeLimit.truncated``, seeds and options applied at the
next ``reset()``), so any SB3 / sb3-contrib algorithm uses it unchanged; the actors
may sit on this machine or anywhere on a Ray cluster. :data:`SyncVecEnv` is the
in-process fallback (no Ray) for unit tests and ``workers=0``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import ray
from gymnasium import spaces
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)
from stable_baselines3.common.vec_env.patch_gym import _patch_env
from stable_baselines3.common.vec_env.util import dict_to_obs, obs_space_info

from swr.parallel import init_ray, limit_threads, worker_threads

# sb3-contrib's MaskablePPO asks for this after every step (``get_action_masks``).
ACTION_MASKS = "action_masks"

# The in-process fallback: same interface, no Ray, envs stepped one after another.
SyncVecEnv = DummyVecEnv

# Ray accepts fractional CPU requests in steps of 1e-4.
_CPU_GRANULARITY = 10_000


class _EnvWorker:
    """One environment inside a Ray actor; mirrors SB3's ``SubprocVecEnv`` worker loop."""

    def __init__(self, env_fn: Callable[[], gym.Env], n_threads: int):
        limit_threads(n_threads)
        self.env = _patch_env(env_fn())
        self.has_masks = self.has_attr(ACTION_MASKS)

    def masks(self) -> Any:
        """The action masks after the step or reset just done (``None`` without masking)."""
        return self.env.get_wrapper_attr(ACTION_MASKS)() if self.has_masks else None

    def spaces(self) -> tuple[spaces.Space, spaces.Space]:
        return self.env.observation_space, self.env.action_space

    def step(self, action: Any) -> tuple[Any, float, bool, dict, dict, Any]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = terminated or truncated
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info: dict = {}
        if done:
            # The agent needs the last observation of the episode to bootstrap a
            # truncated one; the returned observation is the next episode's first.
            info["terminal_observation"] = obs
            obs, reset_info = self.env.reset()
        return obs, reward, done, info, reset_info, self.masks()

    def reset(self, seed: int | None, options: dict) -> tuple[Any, dict, Any]:
        maybe_options = {"options": options} if options else {}
        obs, reset_info = self.env.reset(seed=seed, **maybe_options)
        return obs, reset_info, self.masks()

    def render(self) -> Any:
        return self.env.render()

    def env_method(self, name: str, args: tuple, kwargs: dict) -> Any:
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def get_attr(self, name: str) -> Any:
        return self.env.get_wrapper_attr(name)

    def has_attr(self, name: str) -> bool:
        try:
            self.env.get_wrapper_attr(name)
        except AttributeError:
            return False
        return True

    def set_attr(self, name: str, value: Any) -> None:
        setattr(self.env, name, value)

    def is_wrapped(self, wrapper_class: type[gym.Wrapper]) -> bool:
        return is_wrapped(self.env, wrapper_class)

    def close(self) -> None:
        self.env.close()


class RayVecEnv(VecEnv):
    """Vectorised environments, one per Ray actor, stepped in parallel.

    Each factory in ``env_fns`` is shipped to its actor with cloudpickle and called
    there, so it must be picklable: a module-level function or a
    ``functools.partial`` of one, not a lambda closing over a live environment.
    Functions are shipped by reference, so their module must be importable by the
    workers (a package such as ``swr``, or the driver script's folder); for others,
    such as a test module, call ``ray.cloudpickle.register_pickle_by_value(module)``.
    Anything large the environments share (a supernet's state dict, validation
    tensors) should be put in the object store once by the caller and captured as
    a reference, so it is shipped once per node instead of once per actor::

        weights = ray.put(supernet.state_dict())
        val = ray.put((x_val, y_val))
        env_fns = [functools.partial(make_env, weights, val) for _ in range(n)]
        # inside make_env: state = ray.get(weights); ...

    Each actor reserves ``min(1, free CPUs / n)`` CPUs, so that ``n`` actors fit on
    what is free when they are created (several per core on a small machine, or
    next to other Ray work, rather than waiting forever for CPUs), and runs
    ``threads_per_env`` PyTorch threads (default: the cores divided among the actors).

    Ray is started locally (quietly) if it is not running yet; see
    :func:`swr.parallel.init_ray` to join a cluster instead.
    """

    def __init__(self, env_fns: list[Callable[[], gym.Env]], threads_per_env: int | None = None):
        if not env_fns:
            raise ValueError("RayVecEnv needs at least one environment factory")
        init_ray()
        n_envs = len(env_fns)
        free = ray.available_resources().get("CPU", 0.0)
        num_cpus = int(min(1.0, free / n_envs) * _CPU_GRANULARITY) / _CPU_GRANULARITY
        threads = threads_per_env or worker_threads(n_envs)
        # SPREAD: on a cluster, spread actors over nodes even when their CPU
        # reservations are small enough to pack onto one.
        actor_class = ray.remote(_EnvWorker).options(num_cpus=num_cpus, scheduling_strategy="SPREAD")
        self.actors = [actor_class.remote(fn, threads) for fn in env_fns]
        self.waiting = False
        self.closed = False
        self._pending: list[ray.ObjectRef] = []
        # Action masks returned with the last step/reset, valid until anything else
        # may change an environment: saves MaskablePPO a round trip per step.
        self._masks: list[Any] | None = None
        try:
            observation_space, action_space = ray.get(self.actors[0].spaces.remote())
            super().__init__(n_envs, observation_space, action_space)  # waits for every actor
        except Exception:
            # A factory failed in its actor: free the others' CPU reservations.
            for actor in self.actors:
                ray.kill(actor)
            raise
        self._keys, _, self._dtypes = obs_space_info(observation_space)

    # -- stepping ---------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        refs = [actor.reset.remote(self._seeds[i], self._options[i])
                for i, actor in enumerate(self.actors)]
        obs, reset_infos, masks = zip(*ray.get(refs))
        self.reset_infos = list(reset_infos)
        self._keep_masks(masks)
        # Seeds and options apply to one reset only, as in SB3.
        self._reset_seeds()
        self._reset_options()
        return self._stack_obs(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._pending = [actor.step.remote(action) for actor, action in zip(self.actors, actions)]
        self.waiting = True

    def step_wait(self) -> VecEnvStepReturn:
        results = ray.get(self._pending)
        self._pending = []
        self.waiting = False
        obs, rewards, dones, infos, reset_infos, masks = zip(*results)
        self._keep_masks(masks)
        for i, done in enumerate(dones):
            if done:
                self.reset_infos[i] = reset_infos[i]
        return (self._stack_obs(obs), np.array(rewards, dtype=np.float32),
                np.array(dones, dtype=bool), list(infos))

    def close(self) -> None:
        if self.closed:
            return
        if self.waiting:
            # Let in-flight steps finish so their environments close cleanly.
            ray.wait(self._pending, num_returns=len(self._pending))
        try:
            ray.get([actor.close.remote() for actor in self.actors])
        except ray.exceptions.RayActorError:
            pass  # a dead actor has nothing left to close; kill the others below
        finally:
            for actor in self.actors:
                ray.kill(actor)
            self.closed = True

    # -- attributes and methods of the environments -------------------------------------
    def get_images(self) -> Sequence[np.ndarray | None]:
        if self.render_mode != "rgb_array":
            warnings.warn(f"The render mode is {self.render_mode}, but this method "
                          "assumes it is `rgb_array` to obtain images.")
            return [None] * self.num_envs
        return ray.get([actor.render.remote() for actor in self.actors])

    def has_attr(self, attr_name: str) -> bool:
        # Asked remotely: SB3's default fetches the value, which for a bound method
        # (``action_masks``) would pickle the whole environment back.
        return all(ray.get([actor.has_attr.remote(attr_name) for actor in self.actors]))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return ray.get([a.get_attr.remote(attr_name) for a in self._targets(indices)])

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._masks = None
        ray.get([a.set_attr.remote(attr_name, value) for a in self._targets(indices)])

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None,
                   **method_kwargs) -> list[Any]:
        if (method_name == ACTION_MASKS and not method_args and not method_kwargs
                and self._masks is not None and not self.waiting):
            return [self._masks[i] for i in self._get_indices(indices)]
        self._masks = None
        return ray.get([a.env_method.remote(method_name, method_args, method_kwargs)
                        for a in self._targets(indices)])

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return ray.get([a.is_wrapped.remote(wrapper_class) for a in self._targets(indices)])

    # -- helpers ------------------------------------------------------------------------
    def _targets(self, indices: VecEnvIndices) -> list[Any]:
        return [self.actors[i] for i in self._get_indices(indices)]

    def _keep_masks(self, masks: Sequence[Any]) -> None:
        # Environments without masks answer None; their ``action_masks`` calls must
        # still go to the environment (and fail there as they would in-process).
        self._masks = None if any(m is None for m in masks) else list(masks)

    def _stack_obs(self, obs: Sequence[Any]) -> VecEnvObs:
        """One array per observation key, environment first, in the space's dtype (as DummyVecEnv)."""
        space = self.observation_space
        if isinstance(space, (spaces.Dict, spaces.Tuple)):
            stacked = {k: np.stack([o[k] for o in obs]).astype(self._dtypes[k], copy=False)
                       for k in self._keys}
        else:
            stacked = {None: np.stack(obs).astype(self._dtypes[None], copy=False)}
        return dict_to_obs(space, stacked)
