"""A Stable-Baselines3 actor-critic whose actor is a causal language model (for the token-level wrapper).

The observation is the token window of :class:`dialogue_gym.wrappers.TokenLevel` (``tokens``: padded ids,
``length``: how many are real). The features are the LM decoder's last hidden state at the last real token; the
action logits are the LM's own head applied to it (so the policy starts as the language model, not as a fresh
49k-way linear layer), and the value is a linear head on the same features. Orthogonal initialisation is off:
it would overwrite the pretrained weights. Whatever the LM's dtype (bf16 on CUDA by default), the features, the
logits and the value are fp32: the head's weight is read in fp32 (:class:`FP32Head`), the value head is fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


class LMFeatures(BaseFeaturesExtractor):
    """The LM decoder's last hidden state at position ``length - 1`` of each window, (B, hidden)."""

    def __init__(self, observation_space: spaces.Dict, lm: Any):
        super().__init__(observation_space, features_dim=int(lm.config.hidden_size))
        self.lm = lm

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = observations["tokens"].long()  # (B, W); SB3 hands Box observations over as floats
        length = observations["length"].long().view(-1).clamp(min=1)  # (B,)
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # made on the observations' device
        mask = (positions[None, :] < length[:, None]).long()  # (B, W), real tokens first (right padding)
        hidden = self.lm.get_decoder()(input_ids=tokens, attention_mask=mask).last_hidden_state  # (B, W, H)
        return hidden[torch.arange(len(length), device=hidden.device), length - 1].float()  # (B, H) fp32


class FP32Head(torch.nn.Module):
    """The LM's output layer applied in fp32: the same parameters (trained through the cast), fp32 logits."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.head.bias is None else self.head.bias.float()
        return torch.nn.functional.linear(x.float(), self.head.weight.float(), bias)


class LMActorCriticPolicy(ActorCriticPolicy):
    """``PPO(LMActorCriticPolicy, venv, policy_kwargs={"lm": model})``: actor = the LM's head on its features.

    Args:
        observation_space: the token-level wrapper's Dict space.
        action_space: ``Discrete(vocab)``; vocab must equal the LM's output size.
        lr_schedule: SB3's learning-rate schedule.
        lm: the causal LM (HF ``*ForCausalLM``) to train.
        **kwargs: other ``ActorCriticPolicy`` arguments.
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, lr_schedule: Any, lm: Any,
                 **kwargs: Any):
        head = lm.get_output_embeddings()
        if head.out_features != action_space.n:
            raise ValueError(f"the LM's head has {head.out_features} outputs but the action space has "
                             f"{action_space.n} actions; use the tokenizer that belongs to the LM")
        kwargs.update(features_extractor_class=LMFeatures, features_extractor_kwargs={"lm": lm},
                      net_arch={"pi": [], "vf": []}, ortho_init=False, share_features_extractor=True)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        self.action_net = FP32Head(self.features_extractor.lm.get_output_embeddings())  # logits = the LM's own head
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)
