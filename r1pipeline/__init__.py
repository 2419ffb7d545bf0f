"""r1pipeline: DeepSeek-R1-style post-training (cold-start SFT, GRPO, rejection-sampling SFT,
alignment RL) on TRL trainers, for any causal LM or our DeepSeek-V3-style MoE."""

__version__ = "0.1.0"
