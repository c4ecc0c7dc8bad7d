"""Reference point: Hugging Face `generate` on a Llama of the benchmark shape, on this machine.

A randomly initialised LlamaForCausalLM with modlm's dense `bench` shape (d_model 512, 8 layers,
8 heads, SwiGLU hidden 1376, byte vocabulary, no biases, rotary), greedy decoding from a
512-token prompt, 256 new tokens, float32, batch 1 and 8. Decode tokens/s excludes the prefill:
(time(256 new) - time(1 new)) / 255 steps. Needs `pip install transformers` (with the torch pin).

    python benchmarks/hf_decode.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1376,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    for B in args.batches:
        ids = torch.randint(0, 256, (B, args.prompt_len))
        mask = torch.ones_like(ids)

        def run(n: int, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

        run(4)  # warm up
        speeds = []
        for _ in range(args.repeats):
            full, one = run(args.new_tokens), run(1)
            speeds.append(B * (args.new_tokens - 1) / (full - one))
        print(f"HF generate, batch {B}: decode tokens/s {statistics.median(speeds):.1f} "
              f"(runs: {', '.join(f'{s:.1f}' for s in speeds)})")


if __name__ == "__main__":
    main()
