"""FSDP2 where accelerate would not: on the CPU, over gloo.

accelerate builds its FSDP plugin only for accelerator devices; launched on a machine without GPUs
(ACCELERATE_USE_CPU, one gloo group) an FSDP config becomes plain data parallel (MULTI_CPU) and
shards nothing. torch's `fully_shard` itself runs on CPU tensors over gloo, so the trainers put the
plugin back: accelerate then prepares the model with its own FSDP2 path (`fsdp2_prepare_model`),
saves sharded checkpoints and gathers the full state dict for final/, exactly as on GPUs."""

from __future__ import annotations

import os


def fsdp_requested() -> bool:
    """Launched by `accelerate launch` with an FSDP config (it exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Turn a MULTI_CPU accelerator that was asked for FSDP2 into an FSDP2 one; True if it did."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch exported
    if plugin.fsdp_version != 2:
        raise ValueError(f"fsdp_version {plugin.fsdp_version} on the CPU: only FSDP2 (fully_shard) runs over gloo; "
                         "set fsdp_config.fsdp_version: 2")
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def load_sharded_optimizer(model, optimizer, checkpoint: str) -> None:
    """The optimizer state of an FSDP2 distributed checkpoint (`optimizer_0/`), as the run had it.

    accelerate's loader asks the checkpoint for a state entry of every trainable parameter, but Adam
    creates one only at a parameter's first gradient, and some parameters have had none when a
    checkpoint is written (our MoE's MTP module outside MTP training, a layer no loss reached yet):
    the resume fails with "Missing key in checkpoint state_dict". Here the missing entries are allowed,
    then removed, so those parameters are again without state, exactly as in the uninterrupted run."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    reader = dcp.FileSystemReader(str(Path(checkpoint) / "optimizer_0"))
    saved = reader.read_metadata().state_dict_metadata
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # every parameter's, freshly initialised
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    names = {param: name for name, param in model.named_parameters()}
    for param in list(optimizer.state):
        if not any(key.startswith(f"optimizer.state.{names[param]}.") for key in saved):
            del optimizer.state[param]


def sharded_checkpoints(accelerator) -> bool:
    """FSDP2 writing distributed-checkpoint shards (SHARDED_STATE_DICT, the shipped configs' choice)."""
    plugin = accelerator.state.fsdp_plugin
    return plugin is not None and plugin.fsdp_version == 2 and "SHARDED" in str(plugin.state_dict_type)


def whole_state_dict(model) -> dict:
    """`model.state_dict()` with FSDP2's DTensor shards made whole (a collective per tensor: every rank
    calls it, in the same order); the state dict itself for a model that is not sharded."""
    from torch.distributed.tensor import DTensor

    return {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            for name, tensor in model.state_dict().items()}
