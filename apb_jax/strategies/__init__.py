"""The registry of strategies: every way of running attention across the mesh, by name.

Each strategy is one file of this package exposing `STRATEGY`, an instance of `base.Strategy`.  Config
validation, the CLI's choices, the engine, the replay and the benchmark ask this registry; no other module names a
strategy.  To add one, write its file (see `base.Strategy` for what it must know) and list it below.
"""

from __future__ import annotations

from apb_jax.strategies import apb, full, ring, star, ulysses, zigzag
from apb_jax.strategies.base import Strategy

REGISTRY: dict[str, Strategy] = {m.STRATEGY.name: m.STRATEGY for m in (full, ring, star, apb, ulysses, zigzag)}
DEFAULT = full.NAME  # what Engine and the CLI run when no strategy is named
# the paper's comparison (one device, anchor without passing, APB): what `apb-jax eval` runs unless told
COMPARISON = (full.NAME, star.NAME, apb.NAME)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Strategy:
    """The strategy called `name`, or a ValueError listing the known ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"strategy={name!r} is unknown; allowed: {names()}") from None


def make_layout(strategy: str, hosts: int, doc_len: int, query_len: int, **config):
    """The layout `strategy` gives a prompt of doc_len + query_len tokens over `hosts` hosts; `config`: the other
    `APBConfig` fields (anchor_len, passing_len, q_insert, compressor, ...)."""
    from apb_jax.config import APBConfig

    return get(strategy).make_layout(APBConfig(strategy=strategy, devices=hosts, **config), doc_len, query_len)


def sequence_parallel() -> tuple[str, ...]:
    """The strategies that split the sequence over several hosts."""
    return tuple(n for n, s in REGISTRY.items() if not s.single_device)


__all__ = ["COMPARISON", "DEFAULT", "REGISTRY", "Strategy", "get", "make_layout", "names", "sequence_parallel"]
