"""The experiment runner (record folder, stages, resume, interruption), the paper experiments'
plans (isoFLOP matching, controls), tables, figures and the CLI verb."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modlm import experiments, flops
from modlm import train as train_module
from modlm.config import ConfigError, ModelConfig
from modlm.experiments import controls, isoflop, plots, sizes
from modlm.experiments.plan import interleaved_step_times, plan_experiment
from modlm.experiments.runner import Context, ExperimentInterrupted, run_experiment
from modlm.experiments.spec import MIN_STEPS, Experiment, Options, Report, RunResult, headline_mode
from modlm.experiments.tables import markdown_table, results_table
from modlm.presets import dense

TINY = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, d_mlp=37, max_seq_len=16)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest's `one_thread`)."""


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, str]:
    words = ["the", "router", "picks", "tokens", "and", "blocks", "skip", "others", "quickly"]
    lines = [" ".join(words[(i * j) % len(words)] for j in range(1, 12)) for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return {"data.corpus": str(path), "data.cache_dir": str(tmp_path / "cache"),
            "data.val_fraction": 0.1}


def tiny_experiment(steps: int = 6, two_stages: bool = True) -> Experiment:
    def grid(ctx, results):
        return [ctx.spec("dense", dense(TINY), family="dense", steps=ctx.steps(steps),
                         train={"log_every": 1}),
                ctx.spec("mod", TINY, family="mod", steps=ctx.steps(steps), keep_checkpoint=True,
                         train={"log_every": 1})]

    def again(ctx, results):
        # The later stage sees the earlier results (None when only planning).
        winner = "mod" if results is None else min(results.values(),
                                                   key=lambda r: r.headline_loss).name
        cfg = TINY if winner == "mod" else dense(TINY)
        return [ctx.spec(f"{winner}-s1", cfg, family=winner, seed=1, steps=ctx.steps(steps),
                         tags={"winner": winner})]

    def report(ctx, results):
        path = plots.bars(list(results), [r.headline_loss for r in results.values()],
                          ctx.figure("losses"), ylabel="loss")
        return Report(results_table(list(results.values())) + f"\n\n![]({path.name})",
                      {"runs": sorted(results)})

    return Experiment("tiny", "A tiny experiment", "For tests.",
                      (grid, again) if two_stages else (grid,), report)


def opts(tmp_path: Path, corpus: dict[str, str], name: str = "rec", **kw) -> Options:
    kw.setdefault("eval_windows", 16)
    return Options(out=str(tmp_path / name), overrides=corpus, **kw)


def step_losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "eval" not in r}


# ---- the runner and its record -----------------------------------------------------------------

def test_record_folder_holds_everything_and_rerun_skips(tmp_path, corpus, monkeypatch, capsys):
    root = run_experiment(tiny_experiment(), opts(tmp_path, corpus))
    assert "not part of this plan" not in capsys.readouterr().out
    assert root == tmp_path / "rec" / "tiny"
    for rel in ("experiment.json", "env.json", "report.md", "summary.json", ".gitignore",
                "figures/losses.png", "results/dense.json", "results/mod.json"):
        assert (root / rel).is_file(), rel
    meta = json.loads((root / "experiment.json").read_text())
    assert [r["name"] for r in meta["runs"]][:2] == ["dense", "mod"] and len(meta["runs"]) == 3
    assert meta["command"].startswith("modlm experiment tiny --out ")
    winner = json.loads((root / "summary.json").read_text())["runs"]
    assert len(winner) == 3
    mod = RunResult.from_dict(json.loads((root / "results/mod.json").read_text()))
    dns = RunResult.from_dict(json.loads((root / "results/dense.json").read_text()))
    # Every split in every mode the model has; the headline is the causal one.
    assert set(mod.eval["val"]) == {"topk", "router", "predictor"} == set(mod.eval["pydoc"])
    assert set(dns.eval["val"]) == {"topk"}
    assert (mod.headline_mode, dns.headline_mode) == ("predictor", "topk")
    assert mod.headline_loss == mod.eval["val"]["predictor"]["loss"]
    assert mod.eval["val"]["topk"]["tokens"] == 16 * 16  # the fixed windows, 16 of 16 tokens
    assert mod.steps == 6 and mod.tokens == 6 * 16 * 16
    assert mod.train_flops == pytest.approx(6 * 16 * flops.training_flops(mod.model_config, 16))
    assert mod.median_step_s is not None and mod.median_step_s > 0
    assert mod.aux_share is not None and 0 < mod.aux_share < 1 and dns.aux_share is None
    # keep_checkpoint keeps the weights; other runs drop them once evaluated.
    assert mod.checkpoint is not None and (root / mod.checkpoint / "meta.json").is_file()
    assert dns.checkpoint is None and not (root / "runs/dense/checkpoints").exists()
    assert (root / "runs/dense/metrics.jsonl").is_file()

    # A rerun trains nothing and reproduces the report's numbers.
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(train_module, "train", no_training)
    before = (root / "summary.json").read_text()
    run_experiment(tiny_experiment(), opts(tmp_path, corpus))
    assert (root / "summary.json").read_text() == before
    # A plan that lost a stage names the runs it left behind in the record.
    capsys.readouterr()
    run_experiment(tiny_experiment(two_stages=False), opts(tmp_path, corpus))
    seed_run = next(r for r in winner if r.endswith("-s1"))
    assert f"not part of this plan and not in the report (left by an earlier version of the " \
           f"experiment): {seed_run};" in capsys.readouterr().out


def test_rerun_with_other_options_is_refused(tmp_path, corpus):
    run_experiment(tiny_experiment(two_stages=False), opts(tmp_path, corpus))
    with pytest.raises(ConfigError, match="budget-scale"):
        run_experiment(tiny_experiment(two_stages=False),
                       opts(tmp_path, corpus, budget_scale=2.0))
    with pytest.raises(ConfigError, match="different configuration"):
        run_experiment(tiny_experiment(steps=7, two_stages=False), opts(tmp_path, corpus))


def test_interrupted_run_continues_from_its_checkpoint_exactly(tmp_path, corpus, monkeypatch):
    exp = tiny_experiment(steps=8, two_stages=False)
    run_experiment(exp, opts(tmp_path, corpus, name="straight"))
    real = train_module._forward_backward
    calls = {"n": 0}

    def interrupt_at_third_step(s):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: checkpoint at the end of the step
        return real(s)
    monkeypatch.setattr(train_module, "_forward_backward", interrupt_at_third_step)
    with pytest.raises(ExperimentInterrupted, match="run the same command again"):
        run_experiment(exp, opts(tmp_path, corpus, name="cut"))
    monkeypatch.setattr(train_module, "_forward_backward", real)
    cut = tmp_path / "cut" / "tiny"
    assert not (cut / "results" / "dense.json").exists()
    assert (cut / "runs" / "dense" / "checkpoints" / "step_00000003").is_dir()
    with pytest.raises(ConfigError, match="unfinished run with a different configuration"):
        run_experiment(tiny_experiment(steps=9, two_stages=False),
                       opts(tmp_path, corpus, name="cut"))
    run_experiment(exp, opts(tmp_path, corpus, name="cut"))
    resumed = RunResult.from_dict(json.loads((cut / "results" / "dense.json").read_text()))
    assert resumed.resumed and resumed.steps == 8
    straight = tmp_path / "straight" / "tiny"
    assert step_losses(cut / "runs" / "dense") == step_losses(straight / "runs" / "dense")
    ref = RunResult.from_dict(json.loads((straight / "results" / "dense.json").read_text()))
    assert resumed.headline_loss == ref.headline_loss


def test_run_that_died_before_its_first_checkpoint_starts_again(tmp_path, corpus):
    exp = tiny_experiment(two_stages=False)
    dead = tmp_path / "rec" / "tiny" / "runs" / "dense"
    dead.mkdir(parents=True)
    (dead / "config.json").write_text("{}")
    (dead / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    root = run_experiment(exp, opts(tmp_path, corpus))
    r = RunResult.from_dict(json.loads((root / "results" / "dense.json").read_text()))
    assert not r.resumed and r.steps == 6
    assert 99.0 not in step_losses(root / "runs" / "dense").values()



_HOLD_LOCK = """
import sys, time
from modlm.atomic import FolderLock
FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_folder_another_process_is_writing_is_never_deleted(tmp_path, corpus):
    """A run with no checkpoint is deleted and trained again only under its lock: while another
    process holds it (a second runner of the record training that run), nothing is deleted."""
    exp = tiny_experiment(two_stages=False)
    live = tmp_path / "rec" / "tiny" / "runs" / "dense"
    live.mkdir(parents=True)
    (live / "config.json").write_text("{}")
    (live / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(live)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p.name: p.read_bytes() for p in live.iterdir()}
        with pytest.raises(ConfigError, match=f"{live} is being written by another process "
                                              f"\\(pid {holder.pid} .*nothing was deleted"):
            run_experiment(exp, opts(tmp_path, corpus))
        assert {p.name: p.read_bytes() for p in live.iterdir()} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    root = run_experiment(exp, opts(tmp_path, corpus))  # the writer gone: trained again
    assert 99.0 not in step_losses(root / "runs" / "dense").values()

def test_same_seed_same_result_other_seed_differs(tmp_path, corpus):
    ctx = Context(tiny_experiment(), opts(tmp_path, corpus))
    a = ctx.run(ctx.spec("a", TINY, seed=0, steps=4))
    b = ctx.run(ctx.spec("b", TINY, seed=0, steps=4))
    c = ctx.run(ctx.spec("c", TINY, seed=1, steps=4))
    assert a.eval == b.eval
    assert c.eval["val"]["topk"]["loss"] != a.eval["val"]["topk"]["loss"]


# ---- specs and options -------------------------------------------------------------------------

def test_spec_budget_becomes_steps_and_scale_shrinks_it(tmp_path, corpus):
    ctx = Context(tiny_experiment(), opts(tmp_path, corpus, budget_scale=0.5))
    per_step = 16 * flops.training_flops(TINY, 16)
    s = ctx.spec("x", TINY, flops=ctx.budget(100 * per_step))
    assert s.train.flops == pytest.approx(50 * per_step)
    assert train_module.total_steps(s.train, 1) == 50
    assert s.train.warmup_steps == 2 and s.train.eval_every == 50  # 5% warm-up, final eval
    tiny = ctx.spec("y", TINY, flops=ctx.budget(per_step))  # half a step: MIN_STEPS instead
    assert train_module.total_steps(tiny.train, 1) == MIN_STEPS
    assert ctx.steps(100) == 50 and ctx.steps(2) == MIN_STEPS
    with pytest.raises(ConfigError, match="exactly one"):
        ctx.spec("z", TINY)
    with pytest.raises(ConfigError, match="plain folder name"):
        ctx.spec("a/b", TINY, steps=3)
    # Seeds set initialisation, routing and data order; the data overrides reach every run.
    s1 = ctx.spec("s1", TINY, seed=7, steps=3)
    assert (s1.train.seed, s1.train.data.seed) == (7, 7)
    assert s1.train.data.corpus == corpus["data.corpus"]
    assert s1.config_hash() != ctx.spec("s2", TINY, seed=8, steps=3).config_hash()


def test_options_validate_and_print_the_command():
    with pytest.raises(ConfigError, match="budget-scale"):
        Options(budget_scale=0)
    with pytest.raises(ConfigError, match="eval-windows"):
        Options(eval_windows=0)
    o = Options(out="x", budget_scale=0.01, overrides={"data.corpus": "a b.txt"})
    assert o.command("demo") == ("modlm experiment demo --out x --budget-scale 0.01 "
                                 "--set 'data.corpus=a b.txt'")
    assert Options().windows == 256 and o.windows == 16 and Options(eval_windows=40).windows == 40


def test_headline_mode_is_causal():
    assert headline_mode(TINY) == "predictor"
    assert headline_mode(sizes.with_routing(TINY, predictor=False)) == "router"
    assert headline_mode(dense(TINY)) == "topk"


# ---- the paper experiments' plans --------------------------------------------------------------

def test_isoflop_grid_is_flop_matched_and_spends_each_budget(tmp_path, corpus):
    ctx = Context(isoflop.EXPERIMENT, opts(tmp_path, corpus))
    specs = isoflop.stage_grid(ctx, None)
    assert len(specs) == len(isoflop.BUDGETS) * 2 * isoflop.SIZES_PER_BUDGET
    by_key = {(s.tags["budget"], s.family, tuple(s.tags["rung"])): s for s in specs}
    for (budget, family, rung), s in by_key.items():
        T = s.train.data.seq_len
        per_step = 16 * flops.training_flops(s.model, T)
        steps = train_module.total_steps(s.train, 1)
        assert budget - per_step < steps * per_step <= budget  # exactly the budget, in steps
        if family == "mod":
            twin = by_key[(budget, "dense", rung)].model
            assert s.model.d_model == twin.d_model and s.model.n_layers > twin.n_layers
            ratio = flops.forward_flops(s.model, T).total / flops.forward_flops(twin, T).total
            assert abs(ratio - 1) < 0.08, (rung, ratio)  # matched to one block's granularity
            assert flops.param_count(s.model).total > flops.param_count(twin).total
            r = s.model.routing
            assert (r.capacity, s.model.routed_layers[:2]) == (0.125, (1, 3))
        else:
            assert s.model.is_dense
    # Every budget trains the bottom of the ladder (the first sweep's optima all sat there).
    assert isoflop.GRID == sizes.LADDER[:5]


def fake_result(name: str, family: str, budget: float, rung, seed: int, loss: float,
                step_s: float = 0.1) -> RunResult:
    ev = {"val": {m: {"loss": loss + 0.01 * (m == "router"), "bpb": loss} for m in
                  (("topk", "router", "predictor") if family == "mod" else ("topk",))}}
    return RunResult(name=name, family=family, tags={"budget": budget, "rung": list(rung),
                                                     "seed": seed}, seed=seed, config_hash="",
                     model={}, params=rung[0] ** 2 * rung[1], non_embedding_params=0, seq_len=256,
                     batch_size=16, forward_flops=1e9 * rung[0], training_flops=3e9, steps=10,
                     tokens=0, train_flops=budget, budget=budget, median_step_s=step_s,
                     step_time_samples=5, train_wall_s=1.0, eval_wall_s=1.0, resumed=False,
                     train_lm_loss=None,
                     aux_share=None, eval=ev,
                     headline_mode="predictor" if family == "mod" else "topk", run_dir="",
                     checkpoint=None)


def test_isoflop_reruns_the_best_of_each_family_with_more_seeds(tmp_path, corpus):
    ctx = Context(isoflop.EXPERIMENT, opts(tmp_path, corpus))
    results = {}
    # Each budget has its own winners: dense at rung i, MoD at rung i + 2 for budget i.
    for i, b in enumerate(isoflop.BUDGETS):
        for j, rung in enumerate(isoflop.GRID):
            for fam, best_j in (("dense", i), ("mod", i + 2)):
                r = fake_result(f"{b}-{fam}-{j}", fam, b, rung, 0, 2.0 + abs(j - best_j) * 0.1)
                results[r.name] = r
    specs = isoflop.stage_seeds(ctx, results)
    # seeds 1 and 2 of each family's best, and the random control of the best MoD: seeds 0-2
    assert len(specs) == len(isoflop.BUDGETS) * (2 * 2 + 3)
    for s in specs:
        i = isoflop.BUDGETS.index(s.tags["budget"])
        best_j = i if s.family == "dense" else i + 2
        assert tuple(s.tags["rung"]) == isoflop.GRID[best_j]
        assert s.seed in ((0, 1, 2) if s.family == "random" else (1, 2))
        if s.family == "random":   # the learned MoD's shape and capacity, a random router
            mod = sizes.mod_twin(sizes.dense_model(*isoflop.GRID[best_j]))
            cfg = s.train.model
            assert cfg.routing.router == "random" and not cfg.routing.predictor
            assert (cfg.n_layers, cfg.d_model, cfg.routing.capacity, cfg.routed_layers) == (
                mod.n_layers, mod.d_model, mod.routing.capacity, mod.routed_layers)
    planned = isoflop.stage_seeds(ctx, None)  # planning assumes the middle of each grid
    assert {tuple(s.tags["rung"]) for s in planned} == {isoflop.GRID[2]}


def test_interleaved_step_times_alternate_models_at_each_runs_batch_shape(monkeypatch):
    from modlm import measure
    from modlm.presets import get_preset
    calls = []
    real = measure.train_step_seconds

    def spy(model, x_BT, y_BT, optimizer=None):
        calls.append((model.cfg.n_layers, tuple(x_BT.shape), optimizer is not None))
        real(model, x_BT, y_BT, optimizer)
        return float(model.cfg.n_layers)  # a fake duration that names the model

    monkeypatch.setattr(measure, "train_step_seconds", spy)
    tiny = get_preset("tiny")
    runs = {"a": dataclasses.replace(fake_result("a", "mod", 1e12, (64, 4, 2), 0, 2.0),
                                     model=tiny.to_dict(), batch_size=3, seq_len=16),
            "b": dataclasses.replace(fake_result("b", "dense", 1e12, (64, 4, 2), 0, 2.0),
                                     model=dataclasses.replace(tiny, n_layers=1).to_dict(),
                                     batch_size=2, seq_len=8)}
    times = interleaved_step_times(runs, repeats=3)
    assert times == {"a": float(tiny.n_layers), "b": 1.0}
    shapes = {tiny.n_layers: (3, 16), 1: (2, 8)}
    assert all(shape == shapes[layers] and opt for layers, shape, opt in calls)
    assert [c[0] for c in calls] == [tiny.n_layers, 1, 1, tiny.n_layers] * 2  # alternating


def test_isoflop_report_pairs_seeds_and_marks_optima(tmp_path, corpus):
    ctx = Context(isoflop.EXPERIMENT, opts(tmp_path, corpus))
    results = {}
    for b in isoflop.BUDGETS:
        for j, rung in enumerate(isoflop.GRID):
            for fam, best_j, base in (("dense", 1, 2.0), ("mod", 3, 1.9)):
                for seed in ((0, 1, 2) if j == best_j else (0,)):
                    r = fake_result(f"{b}-{fam}-{j}-{seed}", fam, b, rung, seed,
                                    base + abs(j - best_j) * 0.1 + 0.001 * seed,
                                    step_s=0.1 if fam == "dense" else 0.06)
                    results[r.name] = r
    # The step times come from an interleaved measurement (cached); the logged ones are kept.
    (ctx.root / "measurements").mkdir(parents=True)
    (ctx.root / "measurements" / "step_times.json").write_text(json.dumps(
        {isoflop.budget_label(b): {"dense": 0.2, "mod": 0.11} for b in isoflop.BUDGETS}))
    rep = isoflop.report(ctx, results)
    entry = rep.summary["budgets"][isoflop.budget_label(isoflop.BUDGETS[0])]
    assert entry["seeds"] == [0, 1, 2]
    assert entry["diff_predictor_mean"] == pytest.approx(-0.1)
    assert entry["diff_predictor_sd"] == pytest.approx(0.0, abs=1e-9)
    assert entry["step_time_ratio_mod_over_dense"] == pytest.approx(0.55)
    assert entry["step_time_ratio_logged"] == pytest.approx(0.6)
    assert entry["best_mod"].startswith(f"{isoflop.BUDGETS[0]}-mod-3")
    assert entry["optimum_at_grid_edge"] == {"dense": None, "mod": None}  # both inside the grid
    assert "optimum may lie beyond the grid" not in rep.markdown
    assert (ctx.root / "figures" / "isoflop_params.png").stat().st_size > 1000
    assert "-0.1000 ± 0.0000" in rep.markdown


def test_isoflop_flags_an_optimum_at_the_end_of_its_grid():
    b = isoflop.BUDGETS[0]
    rungs = isoflop.GRID
    for best_j, edge in ((0, "smallest"), (len(rungs) - 1, "largest"), (2, None)):
        runs = {f"{j}": fake_result(f"{j}", "dense", b, rung, 0, 2.0 + abs(j - best_j))
                for j, rung in enumerate(rungs)}
        runs["other budget"] = fake_result("other budget", "dense", isoflop.BUDGETS[1],
                                           (8, 1, 1), 0, 0.5)  # smaller, but another budget
        winner = isoflop.best(runs, b, "dense")
        assert winner.name == f"{best_j}"
        assert isoflop.grid_edge(runs, winner) == edge


def test_controls_change_one_thing_each():
    v = controls.variants()
    mod = v["mod"]
    assert mod == sizes.mod_twin(v["dense"])
    changed = {name: {f for f in ("router", "layers", "capacity", "aux_loss_weight",
                                  "predictor")
                      if getattr(cfg.routing, f) != getattr(mod.routing, f)}
               for name, cfg in v.items() if name not in ("mod", "dense")}
    assert changed == {"random": {"router", "aux_loss_weight", "predictor"},
                       "all-blocks": {"layers"}, "capacity-0.5": {"capacity"},
                       "capacity-0.0625": {"capacity"}, "no-aux": {"aux_loss_weight"}}
    assert len(v["all-blocks"].routed_layers) == mod.n_layers - 1
    T = sizes.SEQ_LEN
    fwd = {n: flops.forward_flops(c, T).total for n, c in v.items()}
    assert fwd["capacity-0.0625"] < fwd["mod"] < fwd["capacity-0.5"]
    assert fwd["all-blocks"] < fwd["mod"]


def test_routers_change_only_how_tokens_are_chosen():
    """Every router of the routers experiment routes the same blocks of the same shape at the
    same capacity as the paper's learned router; each changes only its routing fields."""
    from modlm.experiments import routers
    for shape, (mod, dense_cfg, _) in routers.shapes().items():
        v = routers.routers(mod)
        assert v["learned"] == mod and dense_cfg.is_dense
        for name, cfg in v.items():
            assert (cfg.n_layers, cfg.d_model, cfg.routed_layers, cfg.routing.capacity) == (
                mod.n_layers, mod.d_model, mod.routed_layers, mod.routing.capacity), name
        changed = {name: {f.name for f in dataclasses.fields(cfg.routing)
                          if getattr(cfg.routing, f.name) != getattr(mod.routing, f.name)}
                   for name, cfg in v.items() if name != "learned"}
        assert changed == {"learned-raw": {"router_weight"},
                           "random": {"router", "aux_loss_weight", "predictor"},
                           "threshold": {"router", "aux_loss_weight", "predictor"},
                           "attention": {"router", "aux_loss_weight"},
                           "decoupled-kv": {"kv_capacity"}}, shape


def test_mode_random_controls_change_only_the_router():
    from modlm.experiments import mode
    for variant, control in mode.CONTROLS.items():
        base, rnd = mode.model(variant), mode.model(control)
        assert rnd.routing.router == "random" and base.routing.router == "learned"
        assert dataclasses.replace(rnd, routing=base.routing) == base
        assert rnd.moe == base.moe and rnd.routed_layers == base.routed_layers
    assert set(mode.CONTROLS.values()) <= set(mode.VARIANTS)


def router_result(shape: str, router: str, seed: int, loss: float) -> RunResult:
    r = fake_result(f"{shape}-{router}-s{seed}", "dense" if router == "dense" else "mod", 1e13,
                    (128, 4, 4), seed, loss)
    val = {m: {**e, "loss": loss} for m, e in r.eval["val"].items()}
    pydoc = {m: {**e, "loss": loss + 1.0} for m, e in val.items()}
    layers = [{"layer": 1, "fraction_routed": 0.125, "router_accuracy": None,
               "predictor_accuracy": None}]
    ev = {split: {m: {**e, "layers": [] if router == "dense" else layers}
                  for m, e in modes.items()} for split, modes in
          (("val", val), ("pydoc", pydoc))}
    from modlm.experiments import routers
    cfg = routers._variants(shape)[router]
    return dataclasses.replace(r, tags={"shape": shape, "router": router, "seed": seed}, eval=ev,
                               model=cfg.to_dict(),
                               headline_mode=headline_mode(cfg))


def test_routers_seed_the_leaders_and_judge_against_the_random_spread(tmp_path, corpus):
    from modlm.experiments import routers
    ctx = Context(routers.EXPERIMENT, opts(tmp_path, corpus, budget_scale=0.001))
    first = routers.first_pass(ctx, None)
    assert len(first) == 2 * 7 and len({s.name for s in first}) == 14
    losses = {"learned": 2.00, "learned-raw": 2.02, "random": 2.01, "threshold": 1.90,
              "attention": 2.20, "decoupled-kv": 1.95, "dense": 2.10}
    results = {}
    for shape in ("d128", "d256"):
        for name, loss in losses.items():
            r = router_result(shape, name, 0, loss)
            results[r.name] = r
    specs = routers.more_seeds(ctx, results)
    assert {s.tags["router"] for s in specs} == {"learned", "random", "dense", "threshold",
                                                 "decoupled-kv"}
    assert {s.seed for s in specs} == {1, 2} and {s.tags["shape"] for s in specs} == {"d128"}
    # Seeds: threshold always below random; learned overlaps random.
    for seed, d in ((1, 0.004), (2, -0.004)):
        for name, loss in (("random", 2.01 + d), ("threshold", 1.90 + d), ("learned", 2.01 - d),
                           ("dense", 2.1), ("decoupled-kv", 1.95)):
            r = router_result("d128", name, seed, loss)
            results[r.name] = r
    summary = routers.summarize(results, {})
    t, l = summary["d128"]["threshold"], summary["d128"]["learned"]
    assert t["beats_random_beyond_spread"] and not l["beats_random_beyond_spread"]
    assert t["val_minus_random"] == pytest.approx(1.90 - 2.01)
    assert t["pydoc_minus_random"] == pytest.approx(1.90 - 2.01)
    assert not summary["d256"]["threshold"]["beats_random_beyond_spread"]    # one seed only
    # Decode cost at the same routed share: the causal rule and the key/value share differ.
    cost = {n: e["decode_flops_per_token"] for n, e in summary["d128"].items()}
    assert cost["decoupled-kv"] > cost["learned"] > cost["random"]
    assert cost["threshold"] < cost["learned"]       # no predictor runs at sampling time
    lines = "\n".join(routers.verdicts(summary))
    assert "d128, threshold: -0.1100" in lines and "beats random beyond the seed spread" in lines
    assert "d128, learned: " in lines and "within the seed spread of random" in lines
    assert "d256, threshold" in lines and "one seed only; random's seed spread at d128" in lines


def test_every_experiment_plans_valid_runs(tmp_path, corpus):
    import importlib.util
    for name in experiments.NAMES:
        exp = experiments.get(name)
        overrides = dict(corpus)
        if name == "retrofit":
            # The retrofit plan reads its source's config.json: a tiny Llama folder stands in.
            if importlib.util.find_spec("transformers") is None:
                continue      # the retrofit experiment needs transformers (modlm[hf])
            from support import tiny_hf_model
            tiny_hf_model("llama", vocab=256).save_pretrained(tmp_path / "src")
            overrides["retrofit.source"] = str(tmp_path / "src")
        plan = plan_experiment(exp, opts(tmp_path, overrides, budget_scale=0.001), measure=False)
        assert plan, name
        names = [p.spec.name for p in plan]
        assert len(set(names)) == len(names), name
        for p in plan:
            assert p.steps >= MIN_STEPS and p.train_flops > 0
        if name == "retrofit":        # counted at the source's shape, not the placeholder's
            assert {p.spec.model.d_model for p in plan} == {32}
    with pytest.raises(ConfigError, match="unknown experiment"):
        experiments.get("nope")


def test_plan_measures_step_time(tmp_path, corpus):
    plan = plan_experiment(tiny_experiment(), opts(tmp_path, corpus), timing_steps=1)
    assert len(plan) == 3 and all(p.step_s and p.step_s > 0 for p in plan)
    assert plan[0].seconds == pytest.approx(plan[0].steps * plan[0].step_s)


# ---- tables, figures, CLI ----------------------------------------------------------------------

def test_markdown_table():
    t = markdown_table(["a", "b"], [["x", 1.5], ["y", float("nan")]])
    assert t.splitlines() == ["| a | b |", "|---|---:|", "| x | 1.5 |", "| y | - |"]


def test_plots_draw_the_given_series_into_pngs_of_the_figure_size(tmp_path, monkeypatch):
    figures = {}
    save = plots._save

    def keep(fig, path):      # the figure's artists stay readable after pyplot closes it
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    outs = [
        plots.isoflop_curves({"1e13": {"dense": [(1e5, 2.0), (2e5, 1.9)], "mod": [(3e5, 1.8)]}},
                             tmp_path / "a.png"),
        plots.scatter_families({"dense": [(1.0, 2.0, "x")]}, tmp_path / "b.png", xlabel="x"),
        plots.routing_heatmap({"topk": [[0, 1, 0], [1, 0, 0]]}, ["a", "\n", " "], [1, 3],
                              tmp_path / "c.png"),
        plots.histograms([[1, 2], [3, 0]], [0.0, 0.5, 1.0], ["b1", "b3"], tmp_path / "d.png",
                         xlabel="w"),
        plots.lines({"s": ([1, 2], [0.9, 0.95])}, tmp_path / "e.png", xlabel="x", ylabel="y"),
        plots.bars(["a", "b"], [1.0, math.nan], tmp_path / "f.png", ylabel="y"),
    ]
    # PNG size from the IHDR chunk: the figure's size in inches x the 120 dpi plots saves at.
    sizes = {"a": (504, 432), "b": (768, 528), "c": (960, 300), "d": (768, 480),
             "e": (768, 480), "f": (600, 480)}
    for p in outs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        png_size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        fig_size = tuple(round(x * 120) for x in figures[p.name].get_size_inches())
        assert png_size == fig_size == sizes[p.stem]

    def lines(ax):
        return [(list(l.get_xdata()), list(l.get_ydata())) for l in ax.lines]

    (ax,) = figures["a.png"].axes     # one panel: each family's curve, then its optimum's star
    assert lines(ax) == [([1e5, 2e5], [2.0, 1.9]), ([2e5], [1.9]), ([3e5], [1.8]), ([3e5], [1.8])]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dense", "mod"]
    (ax,) = figures["b.png"].axes
    assert [c.get_offsets().tolist() for c in ax.collections] == [[[1.0, 2.0]]]
    assert [t.get_text() for t in ax.texts] == ["x"]
    (ax,) = figures["c.png"].axes
    assert [im.get_array().tolist() for im in ax.images] == [[[0, 1, 0], [1, 0, 0]]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "⏎", "·"]
    (ax,) = figures["d.png"].axes
    assert [s.get_data().values.tolist() for s in ax.patches] == [[1, 2], [3, 0]]
    (ax,) = figures["e.png"].axes
    assert lines(ax) == [([1, 2], [0.9, 0.95])]
    (ax,) = figures["f.png"].axes      # a NaN value is an empty bar
    assert [r.get_height() for r in ax.patches] == [1.0, 0.0]


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"modlm\[plots\]"):
        plots.require_matplotlib()


def test_cli_plan_prints_runs_and_estimate(tmp_path, corpus, capsys):
    from modlm.cli import main
    sets = [a for k, v in corpus.items() for a in ("--set", f"{k}={v}")]
    assert main(["experiment", "causal", "--plan", "--out", str(tmp_path / "o"),
                 "--budget-scale", "0.0001", *sets]) == 0
    out = capsys.readouterr().out
    assert "| mod-d128-l10 | mod |" in out and "estimated" in out
    assert not (tmp_path / "o").exists()  # planning writes nothing
    with pytest.raises(SystemExit):
        main(["experiment", "nope"])


def test_result_round_trips_through_json():
    r = fake_result("x", "mod", 1e13, (64, 4, 2), 0, 2.0)
    again = RunResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r and dataclasses.asdict(again)["eval"] == r.eval


@pytest.mark.slow  # five real experiments end to end at a tiny budget: about two minutes
@pytest.mark.parametrize("name", ["demo", "causal", "routing", "speed", "routers"])
def test_paper_experiment_end_to_end_at_tiny_budget(tmp_path, corpus, name, capsys):
    from modlm.cli import main
    sets = [a for k, v in corpus.items() for a in ("--set", f"{k}={v}")]
    argv = ["experiment", name, "--out", str(tmp_path), "--budget-scale", "0.0001",
            "--eval-windows", "16", *sets]
    assert main(argv) == 0
    root = tmp_path / name
    report = (root / "report.md").read_text()
    assert "a shrunk smoke run, not a result" in report
    figures = sorted(p.name for p in (root / "figures").glob("*.png"))
    for ref in (l.split("(figures/")[1].rstrip(")") for l in report.splitlines()
                if "](figures/" in l):
        assert ref in figures  # every figure the report shows exists
    assert json.loads((root / "summary.json").read_text())
    assert capsys.readouterr().out.count(f"# {experiments.get(name).title}") == 1
    # A second run trains nothing and measures nothing again.
    before = {p: p.stat().st_mtime_ns for p in (root / "results").glob("*.json")}
    assert main(argv) == 0
    assert before == {p: p.stat().st_mtime_ns for p in (root / "results").glob("*.json")}


def test_run_killed_during_its_final_evaluation_is_evaluated_again(tmp_path, corpus):
    exp = tiny_experiment(two_stages=False)
    root = run_experiment(exp, opts(tmp_path, corpus))
    first = json.loads((root / "results" / "mod.json").read_text())
    (root / "results" / "mod.json").unlink()  # as if killed after training, before the result
    run_experiment(exp, opts(tmp_path, corpus))
    again = RunResult.from_dict(json.loads((root / "results" / "mod.json").read_text()))
    assert again.resumed and again.steps == first["steps"]
    assert again.eval == first["eval"]


def test_a_record_trained_on_several_processors_says_so_in_its_header(tmp_path, corpus):
    from modlm.experiments.runner import training_machines
    ctx = Context(isoflop.EXPERIMENT, opts(tmp_path, corpus))
    results = {}
    for i, model in enumerate(["Xeon", "Xeon", "EPYC", None]):
        r = fake_result(f"run{i}", "mod", 1e13, (64, 4, 2), 0, 2.0)
        results[r.name] = r
        (ctx.runs_dir / r.name).mkdir(parents=True)
        env = {"platform": "Linux"} | ({"cpu_model": model} if model else {})
        (ctx.runs_dir / r.name / "env.json").write_text(json.dumps(env))
    line = training_machines(ctx, results, "Xeon")
    assert "EPYC (1 run)" in line and "Xeon (2 runs)" in line
    assert "a processor not recorded (1 run)" in line
    same = {k: v for k, v in results.items() if k in ("run0", "run1")}
    assert training_machines(ctx, same, "Xeon") == ""


def test_a_record_stays_resumable_when_the_configs_gain_a_field(tmp_path, corpus, capsys):
    """A run recorded before a config field existed (its config.json lacks it, its stored hash
    differs) is the same run when the field's default reproduces it; another value is not."""
    exp = tiny_experiment(two_stages=False)
    root = run_experiment(exp, opts(tmp_path, corpus))
    result_path, config_path = root / "results" / "mod.json", root / "runs" / "mod" / "config.json"
    result = json.loads(result_path.read_text())
    result["config_hash"] = "recorded-before"
    result_path.write_text(json.dumps(result))
    config = json.loads(config_path.read_text())
    del config["model"]["routing"]["skip"], config["model"]["routing"]["capacities"]
    config_path.write_text(json.dumps(config))
    before = result_path.stat().st_mtime_ns
    capsys.readouterr()
    run_experiment(exp, opts(tmp_path, corpus))
    assert "mod: done before, skipped" in capsys.readouterr().out
    assert result_path.stat().st_mtime_ns == before
    config["lr"] = config["lr"] * 2          # a real difference is still refused
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="different configuration"):
        run_experiment(exp, opts(tmp_path, corpus))
