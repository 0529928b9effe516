"""dialogue-gym in other trainers' stacks: an OpenEnv server and client (:mod:`.openenv`) and a TRL
``GRPOTrainer`` rollout (:mod:`.trl`).

Both need the optional extra: ``pip install 'dialogue-gym[integrations]'``. Nothing is imported here, so
``import dialogue_gym`` works without it; importing a submodule without the extra fails with that install line.
"""

INSTALL_HINT = "pip install 'dialogue-gym[integrations]'"
