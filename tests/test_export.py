"""GGUF export (r1pipeline/export.py), verified in llama.cpp itself: xllamacpp (a prebuilt CPU wheel of
llama.cpp with its server) loads the file, tokenises like our tokenizer, and its logprobs match our
model's. Greedy tokens are not compared: a tiny random model gives the same greedy tokens under
wrong exports too (a softmax router, say), so the checks are on logprobs, with a negative control."""

import json
import urllib.request

import pytest
import torch

from data import build_tokenizer
from r1pipeline import export, policy
from r1pipeline.model import R1MoEForCausalLM

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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export")
    return {"fp32": save(tokenizer, root / "fp32"), "fp8": save(tokenizer, root / "fp8", fp8=True),
            "dense": save(tokenizer, root / "dense", first_k_dense_replace=2, num_nextn_predict_layers=0)}


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
    model = R1MoEForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()  # FP8: bf16 by default
    for module in model.modules():  # FP8 weights as loaded (dequantised), computed in fp32 like the GGUF
        if hasattr(module, "fp8"):
            module.fp8 = False
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([prompt + generated])).logits[0].float().log_softmax(-1)
    assert len(candidates) >= 5
    return max(abs(logprobs[len(prompt) - 1 + step, token].item() - value)
               for step, top in candidates.items() for token, value in top.items())


@pytest.mark.parametrize("source,kind", [("fp32", "f32"), ("fp8", "f32"), ("fp32", "q8_0"), ("dense", "f32")])
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
        export.check_exportable({**config, "model_type": "qwen2"}, tokenizer)
    with pytest.raises(export.ExportError, match="the tokenizer is not ours"):
        export.check_exportable(config, {**tokenizer, "pre_tokenizer": {"type": "ByteLevel"}})
