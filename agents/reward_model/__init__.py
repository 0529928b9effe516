"""Reward modelling: Bradley-Terry and pairwise preference models. Run with ``python -m agents.reward_model``."""
