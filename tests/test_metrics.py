"""A run's records (modlm/metrics.py): one writer for step and evaluation records, absent values
absent (null in JSON, no TensorBoard scalar), resumed runs trimmed to their checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from modlm import metrics
from modlm.evaluate import LayerSummary, ModeResult
from modlm.metrics import EvalRecord, MetricsWriter, StepRecord, StepStats


class FakeBoard:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def board(monkeypatch) -> FakeBoard:
    fake = FakeBoard()
    monkeypatch.setattr(metrics, "_open_tensorboard", lambda path: fake)
    return fake


def stats(**kw) -> StepStats:
    base = dict(loss=2.5, lm_loss=2.25, router_aux_loss=0.75, predictor_loss=0.5,
                router_accuracy=(0.875, 0.625), predictor_accuracy=(0.5, 0.25), grad_norm=1.5)
    return StepStats(**{**base, **kw})


def evaluation() -> dict[str, dict[str, ModeResult]]:
    topk = ModeResult("topk", 1.25, 1.75, 96, (LayerSummary(1, 0.25, 1.0, None),))
    router = ModeResult("router", 1.5, 2.0, 96, (LayerSummary(1, 0.375, 0.75, None),))
    return {"val": {"topk": topk, "router": router},
            "pydoc": {"topk": dataclasses.replace(topk, loss=3.0, bits_per_byte=4.0)}}


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_writer_for_steps_and_evaluations(tmp_path, board):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write(StepRecord(7, 700, 1e9, 1e-3, 5000.0, stats()))
    writer.write(EvalRecord(7, 700, 1e9, evaluation()))
    writer.close()
    step, ev = read(tmp_path / "metrics.jsonl")
    assert step == {"step": 7, "tokens": 700, "flops": 1e9, "loss": 2.5, "lm_loss": 2.25,
                    "router_aux_loss": 0.75, "predictor_loss": 0.5,
                    "predictor_accuracy": [0.5, 0.25], "router_accuracy": [0.875, 0.625],
                    "lr": 1e-3, "grad_norm": 1.5, "tokens_per_s": 5000.0}
    assert ev["step"] == 7 and ev["flops"] == 1e9 and set(ev["eval"]) == {"val", "pydoc"}
    assert ev["eval"]["val"]["router"] == {
        "loss": 1.5, "bpb": 2.0, "tokens": 96,
        "layers": [{"layer": 1, "fraction_routed": 0.375, "router_accuracy": 0.75,
                    "predictor_accuracy": None}]}
    assert ev["eval"]["pydoc"]["topk"]["bpb"] == 4.0
    assert board.scalars == [
        ("train/loss", 2.5, 7), ("train/lm_loss", 2.25, 7), ("train/router_aux_loss", 0.75, 7),
        ("train/predictor_loss", 0.5, 7), ("train/lr", 1e-3, 7), ("train/tokens_per_s", 5000.0, 7),
        ("val/topk_loss", 1.25, 7), ("val/topk_bpb", 1.75, 7), ("val/router_loss", 1.5, 7),
        ("val/router_bpb", 2.0, 7), ("pydoc/topk_loss", 3.0, 7), ("pydoc/topk_bpb", 4.0, 7)]
    assert board.closed


def test_absent_values_stay_absent(tmp_path, board):
    """A dense model has no router or predictor loss and no accuracies: null in JSON and no
    scalar, never 0.0; MoE shares appear only for MoE layers; a non-finite step says skipped."""
    writer = MetricsWriter(tmp_path, tensorboard=True)
    dense = stats(router_aux_loss=None, predictor_loss=None, router_accuracy=(),
                  predictor_accuracy=())
    writer.write(StepRecord(1, 10, 2.0, 1e-3, 100.0, dense))
    writer.write(StepRecord(2, 20, 4.0, 1e-3, 100.0, stats(
        loss=math.nan, moe_balance_loss=0.125, moe_noop=(0.5,), moe_dropped=(0.0,))))
    first, second = read(tmp_path / "metrics.jsonl")
    for key in ("router_aux_loss", "predictor_loss", "router_accuracy", "predictor_accuracy"):
        assert key in first and first[key] is None
    assert "moe_noop" not in first and "skipped" not in first
    assert {t for t, _, s in board.scalars if s == 1} == {
        "train/loss", "train/lm_loss", "train/lr", "train/tokens_per_s"}
    assert second["skipped"] is True and math.isnan(second["loss"])
    assert (second["moe_balance_loss"], second["moe_noop"], second["moe_dropped"]) == (
        0.125, [0.5], [0.0])


def test_drop_after_trims_a_resumed_run_to_its_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (2, 4, 6):
        writer.write(StepRecord(step, step, 0.0, 1e-3, 1.0, stats()))
    writer.write(EvalRecord(4, 4, 0.0, evaluation()))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')                 # killed mid-line
    MetricsWriter(tmp_path).drop_after(4)
    assert [(r["step"], "eval" in r) for r in read(tmp_path / "metrics.jsonl")] == [
        (2, False), (4, False), (4, True)]


def test_evaluation_line_names_each_split_and_mode():
    line = EvalRecord(30, 0, 0.0, evaluation()).line()
    assert line == ("eval @ step 30: val topk 1.2500 (1.750 bpb) router 1.5000 (2.000 bpb) | "
                    "pydoc topk 3.0000 (4.000 bpb)")
