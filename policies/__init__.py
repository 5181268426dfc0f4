"""Policy networks, RL trainers, Ray workers, and SWR registered as a bench method.

Importing this package registers ``swr``, ``swr-ppo``, ``swr-random``,
``swr-greedy`` and ``swr-knapsack`` with :func:`swr.methods.register_method`.
"""

from . import swr_method  # noqa: F401  (registration)
