"""Reference models that ship with fxcanon."""

from .relation_network import RelationNetwork

__all__ = ["RelationNetwork"]
