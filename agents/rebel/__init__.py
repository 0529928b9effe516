"""REBEL: Regressing the Relative Reward (arXiv 2404.16767), multi-turn baseline. ``python -m agents.rebel``."""
