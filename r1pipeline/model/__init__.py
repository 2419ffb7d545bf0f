"""Our DeepSeek-V3-architecture policy (DESIGN.md contract 1): MLA, DeepSeekMoE with sigmoid routing and
aux-loss-free bias balancing, multi-token prediction, block-wise FP8 linears, DeepSeek-V3 checkpoints."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .callbacks import RoutingBiasCallback
from .checkpoint import checkpoint_tensors
from .config import PRESETS, R1MoEConfig
from .modeling import R1MoEForCausalLM, R1MoEModel

AutoConfig.register(R1MoEConfig.model_type, R1MoEConfig, exist_ok=True)
AutoModel.register(R1MoEConfig, R1MoEModel, exist_ok=True)
AutoModelForCausalLM.register(R1MoEConfig, R1MoEForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "R1MoEConfig", "R1MoEForCausalLM", "R1MoEModel", "RoutingBiasCallback", "checkpoint_tensors"]
