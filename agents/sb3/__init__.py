"""Stable-Baselines3 (PPO, A2C, DQN) on the numeric wrappers of the dialogue env: ``python -m agents.sb3``."""
