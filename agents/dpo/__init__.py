"""DPO agent: offline DPO on fixed preference pairs and online iterative DPO through the env (python -m agents.dpo)."""
