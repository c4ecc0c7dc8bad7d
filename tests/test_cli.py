"""The command line and the benchmark script run, print what they promise, and fail clearly."""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modlm import cli, flops
from modlm.cli import main
from modlm.config import ConfigError, RoutingConfig, apply_overrides
from modlm.presets import PRESETS, get_preset
from modlm.train import TrainConfig, configure

ROOT = Path(__file__).resolve().parents[1]


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n{name} " in out


def test_dense_twin_has_no_routing_and_same_shape():
    mod, dense = get_preset("small"), get_preset("small-dense")
    assert mod.routed_layers == (1, 3, 5) and dense.routed_layers == ()
    assert (mod.d_model, mod.n_layers, mod.max_seq_len) == (
        dense.d_model, dense.n_layers, dense.max_seq_len)


def test_flops_prints_breakdown_and_ratio(capsys):
    assert main(["flops", "--preset", "bench"]) == 0
    out = capsys.readouterr().out
    cfg = get_preset("bench")
    ratio = flops.forward_flops(cfg).total / flops.forward_flops(get_preset("bench-dense")).total
    assert f"forward FLOP ratio to same-shape dense: {ratio:.4f}" in out
    for component in flops.COMPONENTS:
        assert component in out
    assert "isoFLOP MoD" in out


def test_flops_overrides_change_the_numbers(capsys):
    main(["flops", "--preset", "small"])
    base = capsys.readouterr().out
    main(["flops", "--preset", "small", "--set", "routing.capacity=0.5",
          "--set", "routing.layers=all"])
    changed = capsys.readouterr().out
    assert "capacity 0.5" in changed and "routed blocks 1,2,3,4,5" in changed
    ratio_line = [l for l in changed.splitlines() if l.startswith("forward FLOP ratio")]
    assert ratio_line and ratio_line[0] not in base


def test_flops_budget_to_steps(capsys):
    assert main(["flops", "--preset", "tiny", "--budget", "1e12", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    steps = flops.steps_for_budget(get_preset("tiny"), 1e12, 8)
    assert f"is {steps} steps" in out


@pytest.mark.parametrize("argv, message", [
    (["flops", "--set", "routing.capacity=1.5"], "routing.capacity must be in (0, 1]"),
    (["flops", "--set", "nope=1"], "unknown config key 'nope'"),
    (["flops", "--set", "capacity"], "--set expects KEY=VALUE"),
    (["flops", "--preset", "huge"], "unknown preset 'huge'"),
    (["demo", "--preset", "tiny-dense"], "pick a MoD preset"),
    (["train", "--preset", "tiny", "--set", "lr=[1]"], "lr takes a single value"),
    (["train", "--preset", "tiny", "--set", "model.routing.capacity=true"],
     "model.routing.capacity takes a float"),
    (["train", "--preset", "tiny", "--set", "flops=Infinity"], "flops must be finite"),
    (["train", "--preset", "tiny", "--set", "dtype=float16"], "float16 is ~100x slower"),
    (["train", "--preset", "tiny", "--set", "data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["train", "--resume", "/nonexistent/run"], "not a run folder"),
    (["train", "--resume", "/nonexistent/run", "--set", "lr=1"], "drop --set"),
    (["train", "--preset", "tiny", "--set", "routing.capacity=0.25"],
     "did you mean 'model.routing.capacity'?"),
    (["eval", "/nonexistent/run"], "/nonexistent/run"),
])
def test_bad_input_gives_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("modlm: error:") and message in err


# What each verb's --set configures, applied as the verb applies it (cli.py's cmd_* functions).
SET_TARGETS: dict[str, Callable[[list[str]], Any]] = {
    "flops": lambda items: cli._model_config(argparse.Namespace(preset="small", overrides=items)),
    "demo": lambda items: cli._model_config(argparse.Namespace(preset="small", overrides=items)),
    "train": lambda items: configure("small", cli._parse_overrides(items)),
    # Context.spec (and the retrofit experiment) apply Options.overrides to each run's TrainConfig
    "experiment": lambda items: apply_overrides(TrainConfig(steps=1),
                                                cli._parse_overrides(items)),
    "retrofit": lambda items: apply_overrides(RoutingConfig(), cli._parse_overrides(items)),
}
_VALUE = r"(\[[^\]]*\]|[^\s,;)`]+)"
_COMMAND = re.compile(r"`modlm ([^`]*--set [^`]*)`")        # a quoted command with --set
_SET = re.compile(r"--set ([a-z_][\w.]*=" + _VALUE + ")")      # --set KEY=VALUE in prose
_LISTED = re.compile(r"\b([a-z_][\w.]*=" + _VALUE + ")")       # KEY=VALUE in a --set help


def _set_examples() -> list[tuple[str, str, str]]:
    """(where, verb, KEY=VALUE) of every --set example in the help: the KEY=VALUE pairs of each
    verb's --set help, `--set KEY=VALUE` in its texts (for that verb), and every quoted
    `modlm VERB ... --set KEY=VALUE` command (for VERB, which the parser must accept), also in
    the module docstring."""
    parser = cli.build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    examples: list[tuple[str, str, str]] = []

    def commands(where: str, text: str) -> str:
        for command in _COMMAND.findall(text):
            args = parser.parse_args(shlex.split(command))
            examples.extend((where, args.command, item) for item in args.overrides)
        return _COMMAND.sub("", text)

    for line in commands("module docstring", cli.__doc__).splitlines():
        assert "--set" not in line or "KEY=VALUE" in line, f"name the verb: {line}"
    for verb, sub in verbs.choices.items():
        texts = [sub.description or "", sub.epilog or ""]
        for action in sub._actions:
            if action.dest == "overrides":
                examples.extend((f"{verb} --set help", verb, m.group(1).rstrip("."))
                                for m in _LISTED.finditer(action.help))
            else:
                texts.append(action.help or "")
        for text in texts:
            examples.extend((f"{verb} help", verb, m.group(1).rstrip("."))
                            for m in _SET.finditer(commands(f"{verb} help", text)))
    return examples


def test_every_set_example_in_the_help_is_accepted_by_its_verb():
    parser = cli.build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    with_set = {v for v, sub in verbs.choices.items()
                if any(a.dest == "overrides" for a in sub._actions)}
    assert with_set == set(SET_TARGETS)
    examples = _set_examples()
    assert {verb for _, verb, _ in examples} == with_set      # every verb shows its keys
    assert len(examples) >= 15
    for where, verb, item in examples:
        key = item.partition("=")[0]
        try:
            cfg = SET_TARGETS[verb]([item])
        except ConfigError as e:
            raise AssertionError(f"{where}: `modlm {verb} --set {item}` fails: {e}") from None
        base = SET_TARGETS[verb]([])
        read = functools.partial(functools.reduce, getattr, key.split("."))
        assert read(cfg) != read(base), f"{where}: --set {item} changes nothing"


def test_eval_rejects_non_positive_counts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "somewhere", "--batches", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_demo_runs_every_mode(capsys):
    assert main(["demo", "--preset", "tiny", "--batch", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "time ratio" in out
    routed = get_preset("tiny").routed_layers
    for mode in ("topk", "router", "predictor"):
        rows = [l for l in out.splitlines()
                if l.startswith(mode + " ") and l.split()[1].isdigit()]  # not the FLOP table
        assert [int(r.split()[1]) for r in rows] == list(routed)
    # top-k routes exactly the capacity in every routed block
    for row in (l for l in out.splitlines() if l.startswith("topk ") and l.split()[1].isdigit()):
        assert float(row.split()[2]) == pytest.approx(float(row.split()[3]), abs=1e-3)


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "modlm", "presets"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "gpt2-small-dense" in result.stdout


def test_benchmark_script_runs_and_reports(tmp_path):
    out_json = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--d-model", "32",
         "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch", "2", "--repeats", "2",
         "--warmup", "1", "--json", str(out_json)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(out_json.read_text())
    assert set(data["median_step_s"]) == {"dense", "mod"}
    assert 0 < data["flop_ratio"] < 1
    assert all(v["peak_rss_mib"] > 0 for v in data["peak_memory"].values())
    assert "time ratio MoD/dense" in result.stdout


def test_sample_streams_text_and_reports(tmp_path, capsys):
    from modlm.config import ModelConfig, RoutingConfig
    from modlm.data import DataConfig
    from modlm.train import TrainConfig, train
    corpus = tmp_path / "c.txt"
    corpus.write_text("the router picks tokens and the blocks skip the others\n" * 60)
    cfg = TrainConfig(
        model=ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, d_mlp=37,
                          max_seq_len=32, routing=RoutingConfig(predictor=False)),
        data=DataConfig(corpus=str(corpus), seq_len=32, cache_dir=str(tmp_path / "cache")),
        steps=2, batch_size=2, eval_every=2, eval_batches=1, checkpoint_every=2, device="cpu",
        out_dir=str(tmp_path / "runs"), run_name="r")
    run = train(cfg).run_dir
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "the ", "--max-new-tokens", "6",
                 "--temperature", "0", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the ") and len(captured.out) > len("the ")
    report = captured.err
    assert "6 tokens" in report and "tokens/s decoding" in report and "mode router" in report
    assert "routed per block: 1: " in report and "of a dense cache" in report
    # this model was trained without a predictor: the predictor mode is refused, clearly
    assert main(["sample", str(run), "--prompt", "the ", "--mode", "predictor",
                 "--device", "cpu"]) == 2
    assert "predictor" in capsys.readouterr().err
