"""Reward functions with TRL's signature, found by name in the registry."""

from rewards.registry import REGISTRY, Reward, load_function, register, resolve

__all__ = ["REGISTRY", "Reward", "load_function", "register", "resolve"]
