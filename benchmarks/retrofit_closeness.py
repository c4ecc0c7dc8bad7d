"""How close a retrofitted Hugging Face decoder starts to the original, and how it recovers.

For a tiny Llama and a tiny GPT-2 (byte vocabulary), randomly initialised and after a short dense
training run on CPython's pydoc text, retrofit routers on every other layer (modlm.hf.retrofit)
at several capacities and measure on held-out windows: max and mean |logit difference| against
the original model, the next-token loss of both, and how often their most likely tokens agree,
with the identity start (routed update weight exactly 1) and with modlm's plain sigmoid(r)
weight. Then train the retrofitted model briefly (LM + auxiliary + predictor losses) and compare
its held-out loss in the causal modes with the original model trained densely for as many steps.

    python benchmarks/retrofit_closeness.py                  # both models, default sizes
    python benchmarks/retrofit_closeness.py --pretrain-steps 0 --recover-steps 0   # random only
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from functools import partial

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modlm.config import RoutingConfig  # noqa: E402
from modlm.corpus import load_pydoc_text  # noqa: E402
from modlm.hf.closeness import measure_closeness  # noqa: E402
from modlm.hf.retrofit import retrofit  # noqa: E402


def build(kind: str, args: argparse.Namespace) -> torch.nn.Module:
    import transformers
    d = args.d_model
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_embd=d, n_layer=args.layers, n_head=4,
                                      n_positions=args.seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=d,
                                       intermediate_size=(8 * d) // 3,
                                       num_hidden_layers=args.layers, num_attention_heads=4,
                                       num_key_value_heads=2,
                                       max_position_embeddings=args.seq_len,
                                       bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = args.attn
    return model


def windows(data: torch.Tensor, n: int, T: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - T - 1, (n,), generator=g)
    return torch.stack([data[s:s + T + 1] for s in starts.tolist()])


def train_steps(step_fn, params, data: torch.Tensor, steps: int, args: argparse.Namespace,
                seed: int) -> None:
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = windows(data, args.batch, args.seq_len - 1, g)
        loss = step_fn(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def hf_loss(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x_BT).logits.flatten(0, 1), y_BT.flatten())


def hf_logits(model: torch.nn.Module, x_BT: torch.Tensor) -> torch.Tensor:
    return model(x_BT).logits


def mod_loss(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    return model(x_BT, y_BT).loss   # LM + auxiliary BCE + predictor losses


def mod_logits(model: torch.nn.Module, x_BT: torch.Tensor, mode: str) -> torch.Tensor:
    return model(x_BT, mode=mode).logits_BTV


@torch.no_grad()
def heldout_loss(fn, ids_BT1: torch.Tensor) -> float:
    return float(F.cross_entropy(fn(ids_BT1[:, :-1]).flatten(0, 1), ids_BT1[:, 1:].flatten()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--recover-steps", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    text = torch.tensor(list(load_pydoc_text().encode("utf-8")), dtype=torch.long)
    split = int(0.9 * len(text))
    train_data, val_data = text[:split], text[split:]
    val = windows(val_data, args.eval_windows, args.seq_len - 1, torch.Generator().manual_seed(1))
    T = args.seq_len - 1
    print(f"d_model {args.d_model}, {args.layers} layers, T {T}, byte vocabulary, {args.attn}, "
          f"{torch.get_num_threads()} threads; held-out: {args.eval_windows} windows of pydoc "
          f"text; routers on layers 1, 3, ... (every other); capacity k = floor(c * {T})\n")
    for kind in ("llama", "gpt2"):
        states = [("random", 0)] + ([("trained", args.pretrain_steps)]
                                    if args.pretrain_steps else [])
        for state, steps in states:
            torch.manual_seed(args.seed)
            original = build(kind, args)
            if steps:
                t0 = time.perf_counter()
                original.train()
                train_steps(partial(hf_loss, original), list(original.parameters()),
                            train_data, steps, args, args.seed)
                print(f"[{kind}: {steps} dense pre-training steps in "
                      f"{time.perf_counter() - t0:.0f} s]")
            original.eval()
            print(f"\n{kind}, {state} weights: original held-out loss "
                  f"{heldout_loss(partial(hf_logits, original), val):.4f}")
            print("| weight on routed updates | capacity | max abs logit diff | mean abs logit "
                  "diff | loss original | loss retrofit | top-1 agreement |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for identity in (True, False):
                for capacity in (1.0, 0.5, 0.125):
                    torch.manual_seed(args.seed)
                    model = retrofit(copy.deepcopy(original), RoutingConfig(capacity=capacity),
                                     identity_init=identity)
                    c = measure_closeness(model, val)
                    name = "2 sigmoid(g r), g = 0 (identity start)" if identity else "sigmoid(r)"
                    print(f"| {name} | {capacity} | {c.max_abs_logit_diff:.3g} | "
                          f"{c.mean_abs_logit_diff:.3g} | {c.loss_original:.4f} | "
                          f"{c.loss_retrofit:.4f} | {c.top1_agreement:.3f} |")
            if not (steps and args.recover_steps):
                continue
            # Recovery: retrofit at 12.5% and train; the dense original trains as many steps.
            torch.manual_seed(args.seed)
            model = retrofit(copy.deepcopy(original), RoutingConfig(capacity=0.125)).train()
            dense = copy.deepcopy(original).train()
            t0 = time.perf_counter()
            train_steps(partial(mod_loss, model), list(model.parameters()), train_data,
                        args.recover_steps, args, args.seed + 1)
            train_steps(partial(hf_loss, dense), list(dense.parameters()),
                        train_data, args.recover_steps, args, args.seed + 1)
            model.eval()
            dense.eval()
            modes = {m: heldout_loss(partial(mod_logits, model, mode=m), val)
                     for m in ("topk", "router", "predictor")}
            with torch.no_grad():
                out = model(val[:, :-1], mode="router")
            routed = ", ".join(f"{float(s.fraction):.3f}" for s in out.routing)
            print(f"\nafter {args.recover_steps} more steps ({time.perf_counter() - t0:.0f} s): "
                  f"dense original {heldout_loss(partial(hf_logits, dense), val):.4f}; MoD at "
                  f"12.5% topk {modes['topk']:.4f}, router (causal) {modes['router']:.4f}, "
                  f"predictor (causal) {modes['predictor']:.4f}; routed in router mode per "
                  f"routed layer: {routed}")
        print()


if __name__ == "__main__":
    main()
