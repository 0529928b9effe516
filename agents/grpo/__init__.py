"""GRPO / RLOO / Dr. GRPO with turn-level credit through forks (``python -m agents.grpo``)."""
