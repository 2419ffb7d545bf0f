"""Routing record and replay for MoE RL (R3, arXiv 2510.11370; verl's R2/R3).

The experts a token is sent to while a rollout is generated can differ from those the training
forward picks for the same token: other kernels, FP8 weights, a batch of another shape, or weights one
update later. `recording(model)` keeps the expert ids every MoE layer used, forward by forward;
`replaying(model, routes)` makes the next forwards use given ids instead of choosing, while the
routing weights of those experts still come from the live gate (so the router keeps its gradient).

Routes are int16 tensors [B, S, MoE layers, K] aligned with a batch's tokens; NO_ROUTE (-1) marks a
token with no record (padding, a completion's last token, which generation never feeds back), which
is routed freely. The MTP modules (training-only) are neither recorded nor replayed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

NO_ROUTE = -1
ROUTE_DTYPE = torch.int16  # expert ids < 32768; 2 bytes per (token, layer, k)


def backbone(model):
    """The R1MoEModel inside `model` (a causal LM, a LoRA or DDP wrapper, or the backbone itself)."""
    from .modeling import R1MoEModel

    for module in model.modules():
        if isinstance(module, R1MoEModel):
            return module
    raise TypeError(f"{type(model).__name__} has no R1MoEModel: routing record/replay is for our MoE policy")


def moe_gates(model) -> list:
    return [layer.mlp.gate for layer in backbone(model).layers if layer.is_moe]


def routing_of(model, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the backbone's MoE layers just did, as (ids used, ids chosen freely), each
    [batch, seq, MoE layers, K] in ROUTE_DTYPE; the same tensor twice when nothing was replayed."""
    records = [gate.recorded for gate in moe_gates(model)]
    used = torch.stack([ids for ids, _ in records], dim=1).view(batch, seq, len(records), -1).to(ROUTE_DTYPE)
    if all(ids is free for ids, free in records):
        return used, used
    free = torch.stack([free for _, free in records], dim=1).view(batch, seq, len(records), -1).to(ROUTE_DTYPE)
    return used, free


@contextlib.contextmanager
def recording(model) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Within it, every forward of the backbone appends `routing_of` its batch to the yielded list."""
    base, gates = backbone(model), moe_gates(model)
    if not gates:
        raise TypeError(f"{type(model).__name__} has no MoE layer: there is no routing to record")
    log: list = []
    base.routing_log = log
    for gate in gates:
        gate.recording = True
    try:
        yield log
    finally:
        base.routing_log = None
        for gate in gates:
            gate.recording, gate.recorded = False, None


@contextlib.contextmanager
def replaying(model, routes: torch.Tensor | None):
    """Within it, forwards of the backbone route by `routes` [B, S, MoE layers, K] (None: freely). The
    ids reach each decoder layer as an argument, so a recomputation under gradient checkpointing, after
    the context has closed, replays them too."""
    if routes is None:
        yield
        return

    def inject(module, args, kwargs):
        if kwargs.get("routed_experts") is None:  # the causal LM passes routed_experts=None along
            kwargs["routed_experts"] = routes
        return args, kwargs

    handle = backbone(model).register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def generated_routes(log, prompt_mask: torch.Tensor, completion_lengths: list[int]) -> list[torch.Tensor]:
    """Per sample, the routes of its real tokens in order (prompt then completion), from a recording of
    one `generate` call over left-padded prompts [B, P]: a prefill, then one forward per new token, each
    covering the newest token (with a KV cache) or the whole sequence so far (without). The last token
    of a completion that ran to the length limit was never fed back: NO_ROUTE."""
    P, total = prompt_mask.shape[1], 0
    used = torch.full((prompt_mask.shape[0], P + len(log), *log[0][0].shape[2:]), NO_ROUTE, dtype=ROUTE_DTYPE)
    for step, (routes, _) in enumerate(log):
        total = routes.shape[1] if step == 0 else total + 1
        used[:, total - routes.shape[1]:total] = routes.cpu()
    out = []
    for i, n in enumerate(completion_lengths):
        out.append(torch.cat([used[i, :P][prompt_mask[i].bool().cpu()], used[i, P:P + n]]))
    return out


def aligned(per_sample: list[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, L, K] routes for a padded batch: sample i's routes at the positions its attention mask
    marks, NO_ROUTE elsewhere."""
    B, S = attention_mask.shape
    routes = torch.full((B, S, *per_sample[0].shape[1:]), NO_ROUTE, dtype=ROUTE_DTYPE, device=attention_mask.device)
    for i, sample in enumerate(per_sample):
        where = attention_mask[i].bool()
        if int(where.sum()) != sample.shape[0]:
            raise ValueError(f"routes of sample {i} cover {sample.shape[0]} tokens, its mask {int(where.sum())}")
        routes[i, where] = sample.to(routes.device, ROUTE_DTYPE)
    return routes


def mismatch(rollout: torch.Tensor, train: torch.Tensor, token_mask: torch.Tensor) -> dict[str, float]:
    """How often the training forward's expert sets differ from the rollout's, over the tokens of
    `token_mask` [B, S] that both recorded: `router` per (token, MoE layer), `token` per token (any
    layer differs)."""
    have = token_mask.bool() & (rollout >= 0).all(-1).all(-1) & (train >= 0).all(-1).all(-1)
    if not bool(have.any()):
        return {"router": 0.0, "token": 0.0}
    a, b = rollout[have].long().sort(-1).values, train[have].long().sort(-1).values  # [T, L, K] as sets
    differs = (a != b).any(-1)                                                      # [T, L]
    return {"router": differs.float().mean().item(), "token": differs.any(-1).float().mean().item()}


def nbytes(routes: list[torch.Tensor] | torch.Tensor) -> int:
    items = routes if isinstance(routes, list) else [routes]
    return sum(t.numel() * t.element_size() for t in items)
