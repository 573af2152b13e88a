"""The transformers side of scripts/bench_vs_transformers.py: a worker that runs in the peers' Python 3.11 venv.

torch's CPU wheel exists for Python 3.11 only here, so transformers cannot share the project's 3.12 venv. The
benchmark starts this file with the peer interpreter and talks to it over stdin/stdout, one JSON object per
line, so the two sides can be timed alternately in one run:

    {"cmd": "make_checkpoint", "family": "mixtral", "path": "...", "seed": 0}  -> {"config": {...}}
    {"cmd": "load", "path": "...", "threads": 2}                              -> {"experts_implementation": ...}
    {"cmd": "prefill", "tokens": [[...], ...]}                                -> {"seconds": s, "next": [...]}
    {"cmd": "decode", "tokens": [[...], ...], "steps": n}                     -> {"seconds": s, "tokens": [[...]]}
    {"cmd": "quit"}

prefill times one forward over the prompts (with the KV cache written, as a server's prefill does) and returns
each sequence's greedy next token; decode runs the prefill untimed, then times `steps` greedy decode steps over
the KV cache (one token per sequence per step, sampling included) and returns every sequence's tokens (the
prefill's, then one per step). Prompts have one length (no padding). Needs torch and transformers:

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/peer311
    /tmp/peer311/bin/pip install torch==2.13.0 'transformers==5.17.*' safetensors numpy
"""

from __future__ import annotations

import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DeepseekV2Config, MixtralConfig, Qwen3MoeConfig

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

COMMON = dict(vocab_size=32000, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

# Mid-size members of each family (the sizes of the speed issue's first measurement, DeepSeek-V2 alike).
CONFIGS = {
    "mixtral": lambda: MixtralConfig(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
        num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=None, **COMMON),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1, rms_norm_eps=1e-6,
        use_sliding_window=False, **COMMON),
    "deepseek_v2": lambda: DeepseekV2Config(
        hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=32, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        topk_method="group_limited_greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        first_k_dense_replace=1, rms_norm_eps=1e-6, **COMMON),
}


class Peer:
    def __init__(self):
        self.model = None

    def make_checkpoint(self, family: str, path: str, seed: int = 0) -> dict:
        torch.manual_seed(seed)
        config = CONFIGS[family]()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(path, safe_serialization=True)
        return {"config": config.to_dict().get("model_type")}

    def load(self, path: str, threads: int | None = None, experts_implementation: str | None = None) -> dict:
        if threads:
            torch.set_num_threads(threads)
        kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
        config = self.model.config
        return {"experts_implementation": getattr(config, "_experts_implementation", None),
                "attn_implementation": getattr(config, "_attn_implementation", None),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__}

    @torch.inference_mode()
    def prefill(self, tokens) -> dict:
        ids = torch.tensor(tokens, dtype=torch.long)
        start = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # as generate() does: last position
        nxt = out.logits[:, -1].argmax(-1)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "next": nxt.tolist()}

    @torch.inference_mode()
    def decode(self, tokens, steps: int) -> dict:
        ids = torch.tensor(tokens, dtype=torch.long)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
        generated = [nxt]
        start = time.perf_counter()
        for _ in range(steps):
            out = self.model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            generated.append(nxt)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": torch.stack(generated, 1).tolist()}


def main() -> int:
    peer = Peer()
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            break
        try:
            reply = getattr(peer, cmd)(**request)
        except Exception as e:  # noqa: BLE001 - the orchestrator reports it
            reply = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
