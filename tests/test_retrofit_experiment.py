"""`modlm experiment retrofit` end to end on a tiny random Llama folder with its own tokenizer
(the real SmolLM2-135M run is recorded in benchmarks/experiments/retrofit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the retrofit experiment needs "
                                   "transformers (pip install 'modlm[hf]')")
tokenizers = pytest.importorskip("tokenizers", reason="the tiny source's BPE needs tokenizers")

from safetensors.torch import load_file  # noqa: E402

from modlm.experiments import retrofit as exp  # noqa: E402
from modlm.experiments.runner import run_experiment  # noqa: E402
from modlm.experiments.spec import Options  # noqa: E402

pytestmark = pytest.mark.slow   # trains seven tiny runs and times 12 models (about a minute)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """On one thread (conftest's `one_thread`)."""


def tiny_source(folder: Path, text: str) -> Path:
    """A random 4-layer Llama saved with a byte-level BPE tokenizer trained on `text`."""
    import torch
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_the_retrofit_experiment_tunes_measures_and_reports_learned_beside_random(
        tmp_path, monkeypatch):
    from modlm.corpus import load_builtin_corpus
    text = load_builtin_corpus().train[:60_000]
    src = tiny_source(tmp_path / "src", text)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    # Two settings instead of twelve; short prompts.
    monkeypatch.setattr(exp, "CAPACITIES", (0.5,))
    monkeypatch.setattr(exp, "LAYER_CHOICES", ("upper_half",))
    monkeypatch.setattr(exp, "PROMPT_LEN", 16)
    monkeypatch.setattr(exp, "NEW_TOKENS", 16)
    monkeypatch.setattr(exp, "SPEED_REPEATS", 1)
    monkeypatch.setattr(exp, "LM_EVAL_TASKS", {"n_docs": 2, "doc_words": 40, "n_questions": 8,
                                               "context_words": 16, "choice_words": 4})
    options = Options(out=str(tmp_path / "rec"), budget_scale=0.1, eval_windows=4,
                      overrides={"retrofit.source": str(src), "data.corpus": str(corpus),
                                 "data.cache_dir": str(tmp_path / "cache"),
                                 "data.seq_len": 64})
    root = run_experiment(exp.EXPERIMENT, options)

    summary = json.loads((root / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    settings = ["block-upper-half-c0.5", "attention-upper-half-c0.5"]
    expected = {"original", *(f"{k}-{s}" for s in settings for k in ("learned", "random"))}
    assert expected <= set(rows)
    full = [n for n in rows if n.startswith("all-")]
    # Full tuning: the best setting of each skip kind, learned and random, and the no-routing
    # control.
    assert len(full) == 5 and "all-original" in full
    assert {rows[n]["skip"] for n in full if n != "all-original"} == {"block", "attention"}
    for row in rows.values():
        assert row["val_loss"] > 0 and row["pydoc_loss"] > 0
        for b in ("1", "8"):
            assert row["speed"][b]["decode_tokens_per_s"] > 0
            assert row["speed"][b]["hf_decode_tokens_per_s"] > 0
    # Random controls are evaluated in their causal rule, learned routing in the predictor's.
    assert rows["random-block-upper-half-c0.5"]["mode"] == "router"
    assert rows["learned-block-upper-half-c0.5"]["mode"] == "predictor"
    assert [p["setting"] for p in summary["pairs"]] == settings
    # Only attention is skipped: the MLP still runs on every token, so less is saved.
    assert (rows["learned-attention-upper-half-c0.5"]["forward_flops_ratio"]
            > rows["learned-block-upper-half-c0.5"]["forward_flops_ratio"])
    # The original row's KV cache is dense; routed layers hold fewer entries.
    assert rows["original"]["kv_cache_ratio"] == pytest.approx(1.0)

    # Router-tuning changed no pretrained weight (bitwise) but did move the routers.
    source = load_file(src / "model.safetensors")
    result = json.loads((root / "results" / "learned-block-upper-half-c0.5.json").read_text())
    tuned = load_file(root / result["checkpoint"] / "model.safetensors")
    pretrained = {k: v for k, v in tuned.items()
                  if not any(p in k for p in (".router.", ".predictor.", ".gain"))}
    for key, value in pretrained.items():
        name = key.removeprefix("hf.").replace(".layer.", ".")
        if name not in source:      # the tied head is stored once, as the embedding
            assert name == "lm_head.weight", key
            continue
        assert value.equal(source[name]), key
    assert any(".router." in k for k in tuned)

    # At capacity 1.0 the retrofit is the original: logits and greedy tokens.
    assert summary["capacity_1"]["max_abs_logit_diff"] < 1e-4
    assert summary["capacity_1"]["greedy_identical"] is True

    # lm-eval scored the original (its own folder) and each fully tuned run (its export).
    if exp.harness_available():
        assert set(summary["lm_eval"]) == {"original", *full}
        for scores in summary["lm_eval"].values():
            assert set(scores) == {f"modlm_{d}_{k}" for d in ("plays", "pydoc")
                                   for k in ("ppl", "cloze")}
            assert all(s["bits_per_byte"] > 0 for t, s in scores.items() if t.endswith("_ppl"))
            assert all(0 <= s["acc"] <= 1 for t, s in scores.items() if t.endswith("_cloze"))
        # the untuned original and its tuned twin differ: the export is the tuned model
        assert (summary["lm_eval"]["original"]["modlm_plays_ppl"]
                != summary["lm_eval"]["all-original"]["modlm_plays_ppl"])

    report = (root / "report.md").read_text()
    assert "![frontier](figures/frontier.png)" in report and (root / "figures" /
                                                              "frontier.png").stat().st_size
    assert "Learned routing beats the random control" in report
    assert "all-original" in report
