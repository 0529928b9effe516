"""The old home of the rollout records and store, now :mod:`dialogue_gym.rollout_store` (re-exported here so
code written against this path still imports)."""

from __future__ import annotations

from dialogue_gym.rollout_store import (
    KINDS,
    SCHEMA_VERSION,
    DialogueRecord,
    Record,
    RolloutError,
    RolloutStore,
    StateRecord,
    config_hashes,
    env_core,
    make_states,
    record_from_dict,
    stored_states,
)

__all__ = ["KINDS", "SCHEMA_VERSION", "DialogueRecord", "Record", "RolloutError", "RolloutStore", "StateRecord",
           "config_hashes", "env_core", "make_states", "record_from_dict", "stored_states"]
