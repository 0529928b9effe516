"""REFUEL: Regressing the Relative Future (arXiv 2410.04612). Run with ``python -m agents.refuel``."""
