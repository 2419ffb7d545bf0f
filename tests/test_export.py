"""GGUF export (r1pipeline/export.py), verified in llama.cpp itself: xllamacpp (a prebuilt CPU wheel of
llama.cpp with its server) loads the file, tokenises like the checkpoint's tokenizer, and its logprobs
match the model's in transformers (our DeepSeek-V3 policy, and tiny Llama and Qwen2 models). Greedy tokens are not compared: a tiny random model gives the same greedy tokens under
wrong exports too (a softmax router, say), so the checks are on logprobs, with a negative control."""

import json
import urllib.request

import pytest
import torch

from tokenizers import Regex, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from data import build_tokenizer
from r1pipeline import export, policy

import xllamacpp  # noqa: E402  (a dependency: the GGUF is checked in llama.cpp itself)

TEXTS = [f"User: what is {a} plus {b}?\nAssistant:<think>\n{a} + {b} = {a + b}\n</think>\n<answer>{a + b}</answer>"
         for a in range(0, 200, 7) for b in range(0, 90, 11)]
PROBES = ["12345 + 678 = 13023", "<think>\nI've got it\n</think>\n<answer>42</answer>", "he's   here\n\nthen  ",
          "User: what is 3 plus 4?\nAssistant:"]
PROMPT = "User: what is 120 plus 35?\nAssistant:"
TOLERANCE = {"f32": 1e-3, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS)


def save(tokenizer, path, **config):
    model = policy.build_from_preset("tiny", config, tokenizer, seed=0)
    with torch.no_grad():  # a routing bias that matters, as after training
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_stock(tokenizer, path, kind):
    """A tiny stock model: Llama with grouped KV heads, untied, Llama 3.1's rope scaling; Qwen2 with
    tied embeddings and (randomised) query/key/value biases. Query and key weights are scaled up so
    that attention is sharp and position matters: at init scale a wrong rotation hides (4.6e-3)."""
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, rope_parameters=rope))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(12)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export")
    return {"fp32": save(tokenizer, root / "fp32"), "fp8": save(tokenizer, root / "fp8", fp8=True),
            "dense": save(tokenizer, root / "dense", first_k_dense_replace=2, num_nextn_predict_layers=0),
            "llama": save_stock(tokenizer, root / "llama", "llama"), "qwen2": save_stock(tokenizer, root / "qwen2", "qwen2")}


class Llama:
    """llama.cpp's server on a GGUF, on loopback, one thread."""

    def __init__(self, gguf):
        params = xllamacpp.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = 256
        params.cpuparams.n_threads = 1
        params.hostnames = ["127.0.0.1"]
        # The weights are what is compared: an f32 KV cache, and no flash attention, whose CPU kernel
        # rounds through f16 (measured on a trained checkpoint: 1.0e-2 with it, 4.5e-5 without).
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.server = xllamacpp.Server(params)

    def post(self, path, body):
        request = urllib.request.Request(self.server.listening_address + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def greedy(self, prompt_ids, tokens=10, top=5):
        """The greedy tokens, and {step: {id: logprob} of the top candidates}. llama.cpp reports
        candidates only at steps that complete a UTF-8 character, so they are placed by token id."""
        out = self.post("/completion", {"prompt": prompt_ids, "n_predict": tokens, "temperature": 0, "n_probs": top,
                                        "return_tokens": True})
        generated, candidates, step = out["tokens"], {}, 0
        for entry in out["completion_probabilities"]:
            step = generated.index(entry["id"], step)
            candidates[step] = {cand["id"]: cand["logprob"] for cand in entry["top_logprobs"]}
            step += 1
        return generated, candidates


def max_logprob_error(checkpoint, gguf, tokenizer) -> float:
    """Largest |Δ logprob| over the top-5 candidates of 10 greedy steps of llama.cpp, against our model
    (fp32; an FP8 checkpoint dequantised) on the same prefixes."""
    prompt = tokenizer(PROMPT)["input_ids"]
    generated, candidates = Llama(gguf).greedy(prompt)
    model = policy.load_pretrained(str(checkpoint), "float32").eval()
    for module in model.modules():  # FP8 weights as loaded (dequantised), computed in fp32 like the GGUF
        if hasattr(module, "fp8"):
            module.fp8 = False
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([prompt + generated])).logits[0].float().log_softmax(-1)
    assert len(candidates) >= 5
    return max(abs(logprobs[len(prompt) - 1 + step, token].item() - value)
               for step, top in candidates.items() for token, value in top.items())


@pytest.mark.parametrize("source,kind", [("fp32", "f32"), ("fp8", "f32"), ("fp32", "q8_0"), ("dense", "f32"),
                                         ("llama", "f32"), ("qwen2", "f32"), ("llama", "q8_0")])
def test_llama_cpp_loads_the_export_and_matches_our_logprobs(checkpoints, tokenizer, tmp_path, source, kind):
    gguf = export.export_gguf(checkpoints[source], tmp_path / "model.gguf", kind)
    digest = (tmp_path / "model.gguf.sha256").read_text().split()[0]
    import hashlib

    assert digest == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert max_logprob_error(checkpoints[source], gguf, tokenizer) <= TOLERANCE[kind]


def test_llama_cpp_tokenises_like_our_tokenizer(checkpoints, tokenizer, tmp_path):
    llama = Llama(export.export_gguf(checkpoints["fp32"], tmp_path / "model.gguf"))
    for text in PROBES:
        assert llama.post("/tokenize", {"content": text})["tokens"] == tokenizer(text)["input_ids"], text


def test_a_wrong_export_is_caught_by_the_logprob_check(checkpoints, tokenizer, tmp_path, monkeypatch):
    """Negative control: without `expert_gating_func` llama.cpp routes by softmax, the output still
    looks plausible, and the parity check must fail."""
    keys = export.hparams
    monkeypatch.setattr(export, "hparams", lambda config: [key for key in keys(config)
                                                            if key[0] != "add_expert_gating_func"])
    gguf = export.export_gguf(checkpoints["fp32"], tmp_path / "wrong.gguf")
    assert max_logprob_error(checkpoints["fp32"], gguf, tokenizer) > 10 * TOLERANCE["f32"]


@pytest.mark.parametrize("wrong", [("permute_rope_rows", lambda weight, n_head: weight), ("rope_freqs", lambda model: None)])
def test_a_wrong_llama_export_is_caught(checkpoints, tokenizer, tmp_path, monkeypatch, wrong):
    """Negative controls for the stock path: the query/key rows left in HF's rotate-half order (llama.cpp
    rotates adjacent pairs), or Llama 3.1's rope scaling left out (measured: 0.45 and 0.32)."""
    monkeypatch.setattr(export, *wrong)
    gguf = export.export_gguf(checkpoints["llama"], tmp_path / "wrong.gguf")
    assert max_logprob_error(checkpoints["llama"], gguf, tokenizer) > 10 * TOLERANCE["f32"]


STOCK_PROBES = PROBES + ["I'VE got 1234567 apples, don't   you?\n\n  x", "a1b22c333 ... !!\r\n"]


@pytest.mark.parametrize("split,bos", [("qwen2", False), ("llama-bpe", True)])
def test_llama_cpp_tokenises_like_a_stock_split_tokenizer(checkpoints, tmp_path, split, bos):
    """A byte-level BPE with Qwen2's or Llama 3's split regex (Llama 3's tokenizer also prepends its BOS),
    trained here, tokenises in llama.cpp exactly as in transformers under the mapped pre-tokenizer."""
    regex = next(pattern for pattern, name in export.STOCK_SPLITS.items() if name == split)
    stock = build_tokenizer(TEXTS)
    backend = stock.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if bos:
        stock.add_special_tokens({"bos_token": "<|begin_of_text|>"})
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", stock.bos_token_id)])
    path = save_stock(stock, tmp_path / "stock", "qwen2")
    assert json.loads((path / "tokenizer.json").read_text())["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] \
        == regex
    llama = Llama(export.export_gguf(path, tmp_path / "model.gguf"))
    for text in STOCK_PROBES:
        ours = stock(text)["input_ids"]
        assert (ours[0] == stock.bos_token_id) == bos
        assert llama.post("/tokenize", {"content": text, "add_special": True})["tokens"] == ours, text


def test_chat_completion_through_llama_cpp_server(checkpoints, tmp_path):
    llama = Llama(export.export_gguf(checkpoints["fp32"], tmp_path / "model.gguf"))
    reply = llama.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "what is 3 plus 4?"}],
                                                "max_tokens": 6, "temperature": 0})
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] == 6 and reply["usage"]["prompt_tokens"] > 5


def test_what_llama_cpp_would_misread_is_refused(checkpoints, tmp_path):
    config = json.loads((checkpoints["fp32"] / "config.json").read_text())
    tokenizer = json.loads((checkpoints["fp32"] / "tokenizer.json").read_text())
    with pytest.raises(export.ExportError, match="rope_interleave = false"):
        export.check_exportable({**config, "rope_interleave": False}, tokenizer)
    with pytest.raises(export.ExportError, match="27 layers with q_lora_rank"):
        export.check_exportable({**config, "num_hidden_layers": 27, "q_lora_rank": 64}, tokenizer)
    with pytest.raises(export.ExportError, match="convert_hf_to_gguf.py"):
        export.check_exportable({**config, "model_type": "mistral"}, tokenizer)
    with pytest.raises(export.ExportError, match="the tokenizer is neither ours"):
        export.check_exportable(config, {**tokenizer, "pre_tokenizer": {"type": "ByteLevel"}})
    stock = json.loads((checkpoints["qwen2"] / "config.json").read_text())
    with pytest.raises(export.ExportError, match="rope scaling 'yarn' on qwen2"):
        export.check_exportable({**stock, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, tokenizer)
    with pytest.raises(export.ExportError, match="sliding-window"):
        export.check_exportable({**stock, "use_sliding_window": True}, tokenizer)
    llama = json.loads((checkpoints["llama"] / "config.json").read_text())
    with pytest.raises(export.ExportError, match="llama with attention or MLP biases"):
        export.check_exportable({**llama, "attention_bias": True}, tokenizer)
    export.check_exportable(llama, tokenizer)  # llama3 rope scaling is exported


def test_the_modelfile_follows_the_runs_prompt_format(checkpoints, tmp_path):
    """R1's plain template for an r1-format run (the default); the model's own (in the GGUF) for a
    chat-format run, as a stock instruct model's."""
    final = tmp_path / "align" / "final"
    final.mkdir(parents=True)
    (final / "tokenizer_config.json").write_text((checkpoints["qwen2"] / "tokenizer_config.json").read_text())
    stage_config = final.parent / "stage_config.json"
    stage_config.write_text(json.dumps({"config": {"data": {"prompt_format": "r1"}}}))
    plain = export.modelfile(final, "m.gguf")
    assert "FROM ./m.gguf" in plain and "TEMPLATE" in plain and "User: " in plain
    stage_config.write_text(json.dumps({"config": {"data": {"prompt_format": "chat"}}}))
    chat = export.modelfile(final, "m.gguf")
    assert "FROM ./m.gguf" in chat and "TEMPLATE" not in chat
