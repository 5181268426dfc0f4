"""swr: budget-constrained parameter-efficient transfer by Scalable Weight Reparametrization."""

from ._version import __version__

__all__ = ["__version__"]
