"""NP-DPO: LLM policies steered at inference time by a user's context pairs.

A causal LM with LoRA adapters (peft) whose blocks' attention outputs are FiLM-modulated by a hypernetwork
of the user's context embedding z (:mod:`~steerable.policy.model`), trained with the conditional DPO loss
(:mod:`~steerable.policy.trainer`), evaluated by implicit-reward accuracy and the label-swap test
(:mod:`~steerable.policy.evaluation`), and sampled from with a user's context
(:mod:`~steerable.policy.generation`).
"""

from steerable.policy.generation import SteeredPolicy, generate, interpolate, load_policy
from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model
from steerable.policy.trainer import PolicyTrainConfig, train_policy

__all__ = [
    "ConditionalPolicy",
    "PolicyConfig",
    "PolicyTrainConfig",
    "SteeredPolicy",
    "generate",
    "interpolate",
    "load_base_model",
    "load_policy",
    "train_policy",
]
