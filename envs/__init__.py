"""The layer-selection problem: its decision process, Gymnasium environment and evaluators.

:mod:`.mdp` holds the mask, observation and step as plain functions (the policy
network's rollout uses them too); :mod:`.layer_select` the environment over them;
:mod:`.evaluator` the evaluators (a selection's validation score on the supernet)
and :mod:`.prefix_cache` the cache that makes scoring cheaper.

Registered ids: ``swr/LayerSelect-v0`` (pass ``features``, ``costs``, ``budget``,
``evaluator``) and ``swr/LayerSelectSynthetic-v0`` (a made-up network with a
deterministic evaluator, for checks and tutorials).
"""

import gymnasium as gym

from .evaluator import CachedEvaluator, Evaluator, SupernetEvaluator, SyntheticEvaluator, canonical
from .features import layer_features
from .layer_select import LayerSelectEnv, make_synthetic_env

if "swr/LayerSelect-v0" not in gym.registry:
    gym.register("swr/LayerSelect-v0", entry_point="swr.envs.layer_select:LayerSelectEnv")
    gym.register("swr/LayerSelectSynthetic-v0",
                 entry_point="swr.envs.layer_select:make_synthetic_env")

__all__ = ["CachedEvaluator", "Evaluator", "LayerSelectEnv", "SupernetEvaluator",
           "SyntheticEvaluator", "canonical", "layer_features", "make_synthetic_env"]
