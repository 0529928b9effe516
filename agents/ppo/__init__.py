"""Token-level PPO agent for the multi-turn dialogue env (python -m agents.ppo)."""
