"""Exported modlm folders in stock clients, offline: transformers' `trust_remote_code` loading
through the folder's shim (modlm.hf.export) and lm-evaluation-harness's own command line
(`lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True`).

The model is a tiny random MoD model (conftest's shape, byte vocabulary, routed blocks 1 and 3,
learned router with the auxiliary loss, so the causal "router" mode is the one it evaluates in;
weights at std 0.5 so scores vary). The lm_eval runs use local task files
(tests/data/lm_eval: a wikitext-like perplexity task and a multiple-choice task over jsonl
files) with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 and a private HF_HOME, so the module and
dataset caches they fill are the test's own.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from support import needs_gpt2_files, needs_tokenizers, needs_transformers

from modlm.hf import harness
from modlm.hf.harness import offline_env
from modlm.model import MoDLM

pytestmark = needs_transformers
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness is not installed (pip install 'modlm[eval]')")

DATA = Path(__file__).parent / "data" / "lm_eval"
TASKS = ("modlm_ppl", "modlm_mc")
CONTEXT = 64          # the model's max_seq_len, lm-eval's window


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the MoDLM, its run folder, its export folder)."""
    from modlm import hf
    from modlm.checkpoint import save_checkpoint
    from modlm.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    cfg = tiny_config(routing=dict(router="learned", aux_loss_weight=0.01), vocab_size=256,
                      init_std=0.5, max_seq_len=CONTEXT)
    model = MoDLM(cfg).eval()
    assert tuple(model.cfg.routed_layers) == (1, 3)
    root = tmp_path_factory.mktemp("lm_eval_model")
    save_checkpoint(root / "run", step=1, model=model, optimizer_state=None,
                    trainer_state={"step": 1}, model_cfg=model.cfg, tokenizer=ByteTokenizer())
    out = hf.export_checkpoint(root / "run", root / "hf")
    return model, root / "run", out


# ---- the shim ---------------------------------------------------------------------------------


def test_export_writes_the_shim_and_auto_map(exported):
    _, _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "modlm"
    assert config["auto_map"] == {"AutoConfig": "modeling_modlm.ModLMConfig",
                                  "AutoModelForCausalLM": "modeling_modlm.ModLMForCausalLM"}
    shim = (out / "modeling_modlm.py").read_text()
    assert "from modlm.hf.modeling import ModLMConfig, ModLMForCausalLM" in shim
    assert "pip install 'modlm[hf]'" in shim
    # Only the shim: no copy of modlm's code travels with the folder.
    assert sorted(p.name for p in out.glob("*.py")) == ["modeling_modlm.py"]


def test_make_remote_loadable_is_generic_and_checks_its_arguments(tmp_path):
    from modlm.hf.export import make_remote_loadable
    from modlm.hf.modeling import from_modlm
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        make_remote_loadable(tmp_path)
    from_modlm(MoDLM(tiny_config())).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["x.Slow", None]}
    config_file.write_text(json.dumps(config))
    # Another class pair, module name and install hint: what a second model kind would pass.
    shim = make_remote_loadable(tmp_path, config_class="ModLMConfig",
                                model_class="ModLMForCausalLM",
                                source_module="modlm.hf.modeling", module_name="modeling_other",
                                install="pip install 'modlm[hf]' other")
    assert shim == tmp_path / "modeling_other.py"
    again = make_remote_loadable(tmp_path, module_name="modeling_other",
                                 install="pip install 'modlm[hf]' other")
    assert again.read_text() == shim.read_text()   # idempotent
    assert "pip install 'modlm[hf]' other" in shim.read_text()
    compile(shim.read_text(), str(shim), "exec")
    auto_map = json.loads(config_file.read_text())["auto_map"]
    assert auto_map == {"AutoTokenizer": ["x.Slow", None],
                        "AutoConfig": "modeling_other.ModLMConfig",
                        "AutoModelForCausalLM": "modeling_other.ModLMForCausalLM"}
    assert not list(tmp_path.glob(".*.tmp"))     # atomic writes leave nothing behind
    with pytest.raises(ValueError, match="identifier"):
        make_remote_loadable(tmp_path, module_name="modeling.modlm")
    with pytest.raises(ValueError, match="has no NoSuchModel"):
        make_remote_loadable(tmp_path, model_class="NoSuchModel")
    with pytest.raises(ModuleNotFoundError):
        make_remote_loadable(tmp_path, source_module="modlm.no_such_module")
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        make_remote_loadable(tmp_path)


_REMOTE_LOAD = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import modlm.hf.modeling as M
from modlm.checkpoint import load_model, resolve_checkpoint

out, run, again = map(Path, sys.argv[1:4])
config = AutoConfig.from_pretrained(out, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
ref, _ = load_model(resolve_checkpoint(run))
ids = torch.tensor([tok.encode("To be, or not to be")])
with torch.no_grad():
    diff = (model(ids).logits - ref(ids, mode="router").logits_BTV).abs().max().item()
marks = [M.ModLMConfig._auto_class, M.ModLMForCausalLM._auto_class]
from modlm import hf
hf.export_checkpoint(run, again)     # after a remote-code load, in the same process
print(json.dumps({
    "config_class": type(config) is M.ModLMConfig,
    "model_class": type(model) is M.ModLMForCausalLM,
    "training": model.training, "diff": diff,
    "tokenizer": [type(tok).__name__, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id],
    "marks": marks,
    "marks_after": [M.ModLMConfig._auto_class, M.ModLMForCausalLM._auto_class],
    "again_py": sorted(p.name for p in again.glob("*.py")),
    "again_auto_map": json.loads((again / "config.json").read_text())["auto_map"],
}))
"""


def test_export_loads_with_trust_remote_code_offline_as_modlms_own_classes(exported, tmp_path):
    # A fresh process: remote-code loading marks the classes process-wide (modlm.hf.export).
    _, run, out = exported
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(out), str(run),
                           str(tmp_path / "again")], env=offline_env(home), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["config_class"] and got["model_class"] and not got["training"]
    assert got["diff"] == 0.0
    assert got["tokenizer"] == ["TokenizersBackend", 0, 0, None]
    # transformers imported the shim from its module cache (the remote-code path, not a
    # registration) ...
    assert list((home / "modules" / "transformers_modules").rglob("modeling_modlm.py"))
    # ... which marks modlm's classes; an export made afterwards still holds the shim alone.
    assert got["marks"] == got["marks_after"] == ["AutoConfig", "AutoModelForCausalLM"]
    assert got["again_py"] == ["modeling_modlm.py"]
    assert got["again_auto_map"]["AutoModelForCausalLM"] == "modeling_modlm.ModLMForCausalLM"


def test_register_still_loads_the_export_without_remote_code(exported):
    from transformers import AutoModelForCausalLM

    from modlm import hf
    from modlm.hf.modeling import ModLMForCausalLM
    model, _, out = exported
    hf.register()
    loaded = AutoModelForCausalLM.from_pretrained(out)     # no trust_remote_code
    assert type(loaded) is ModLMForCausalLM
    ids = torch.tensor([list(b"O Romeo")])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids, mode="router").logits_BTV)


# ---- tokenizer special tokens ------------------------------------------------------------------


def _bpe():
    from modlm.tokenizer import BPETokenizer
    return BPETokenizer.train("the quick brown fox jumps over the lazy dog. " * 40, 300)


@pytest.mark.parametrize("kind", [
    "bytes", pytest.param("bpe", marks=needs_tokenizers),
    pytest.param("gpt2", marks=[needs_tokenizers, needs_gpt2_files])])
def test_every_exported_tokenizer_declares_an_end_of_text_token(kind, tmp_path):
    from transformers import AutoTokenizer

    from modlm.hf.tokenizer import save_hf_tokenizer, special_token_ids
    from modlm.tokenizer import ByteTokenizer, GPT2Tokenizer
    tok = {"bytes": ByteTokenizer, "bpe": _bpe, "gpt2": GPT2Tokenizer.from_package}[kind]()
    save_hf_tokenizer(tok, tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    ids = special_token_ids(tok)
    # lm-eval's prefix_token_id is the bos, else the eos: here the eos, the end-of-text token.
    assert exported.bos_token_id is None
    assert exported.eos_token_id == exported.pad_token_id == ids["eos_token_id"] \
        == ids["pad_token_id"]
    if kind == "bytes":
        assert exported.eos_token_id == 0                             # NUL
    else:
        assert exported.eos_token == "<|endoftext|>"
    text = "To be\x00 or <|endoftext|>"
    assert exported.encode(text) == tok.encode(text)       # nothing added, specials as text
    assert exported.decode(exported.encode(text)) == tok.decode(tok.encode(text))


# ---- lm-evaluation-harness ---------------------------------------------------------------------


def _task_dir(tmp_path: Path) -> Path:
    """The task files with their data_files made absolute."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, data in (("modlm_ppl", "ppl.jsonl"), ("modlm_mc", "mc.jsonl")):
        text = (DATA / f"{name}.yaml").read_text()
        assert f"test: {data}\n" in text
        (tasks / f"{name}.yaml").write_text(
            text.replace(f"test: {data}\n", f"test: {json.dumps(str(DATA / data))}\n"))
    return tasks


def test_text_tasks_are_deterministic_and_name_the_true_continuation(tmp_path):
    import yaml
    text = " ".join(f"w{i}" for i in range(2000))      # every word distinct
    names = harness.write_text_tasks(tmp_path / "a", {"doc": text}, n_docs=3, doc_words=50,
                                     n_questions=10, context_words=20, choice_words=5)
    assert names == ["modlm_doc_ppl", "modlm_doc_cloze"]
    harness.write_text_tasks(tmp_path / "b", {"doc": text}, n_docs=3, doc_words=50,
                             n_questions=10, context_words=20, choice_words=5)
    for name in names:
        a, b = ((tmp_path / d / f"{name}.jsonl").read_text() for d in "ab")
        assert a == b
        config = yaml.safe_load((tmp_path / "a" / f"{name}.yaml").read_text())
        assert config["task"] == name
        assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "a" /
                                                                     f"{name}.jsonl")
    docs = [json.loads(x) for x in (tmp_path / "a" / "modlm_doc_ppl.jsonl").open()]
    assert [d["text"].split()[0] for d in docs] == ["w0", "w666", "w1332"]
    assert all(len(d["text"].split()) == 50 for d in docs)
    questions = [json.loads(x) for x in (tmp_path / "a" / "modlm_doc_cloze.jsonl").open()]
    labels = set()
    for i, q in enumerate(questions):
        words = q["context"].split()
        assert words[0] == f"w{200 * i}" and len(words) == 20
        assert len(q["choices"]) == len(set(q["choices"])) == 4
        true = q["choices"][q["label"]]
        assert true.split() == [f"w{200 * i + 20 + k}" for k in range(5)]
        assert all(c.startswith(" ") and len(c.split()) == 5 for c in q["choices"])
        labels.add(q["label"])
    assert len(labels) > 1          # the true continuation is not always in one place
    with pytest.raises(ValueError, match="fewer than"):
        harness.ppl_documents("a b c", 2, 5)
    with pytest.raises(ValueError, match="questions"):
        harness.cloze_questions(text, 3, 20, 5)
    with pytest.raises(ValueError, match="repeats itself"):
        harness.cloze_questions("same words " * 500, 10, 20, 5)
    with pytest.raises(ValueError, match="lower-case"):
        harness.write_text_tasks(tmp_path / "c", {"Doc-1": text})


def _run_lm_eval(out: Path, tasks: Path, batch_size: int, work: Path) -> tuple[dict, dict]:
    """Run the stock CLI; (its results JSON, {task: its logged samples by doc_id})."""
    return harness.run(out, tasks, list(TASKS), work=work, batch_size=batch_size,
                       log_samples=True, timeout=600)


def _loglikelihood(model: MoDLM, context: list[int], continuation: list[int]
                   ) -> tuple[float, bool]:
    """modlm's own full forward (causal router mode): log p(continuation | context), greedy?"""
    ids = torch.tensor([(context + continuation)[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(ids, mode="router").logits_BTV[0].double(), dim=-1)
    rows = logp[len(context) - 1:]
    target = torch.tensor(continuation)
    ll = rows.gather(1, target[:, None]).sum().item()
    return ll, bool((rows.argmax(-1) == target).all())


def _metrics(results: dict, task: str) -> dict[str, float]:
    return {f"{k},none": v for k, v in harness.scores(results)[task].items()}


@pytest.mark.slow
@needs_lm_eval
def test_lm_eval_cli_scores_the_export_offline_like_modlm_at_any_batch_size(exported, tmp_path):
    model, _, out = exported
    tasks = _task_dir(tmp_path)
    runs = {bs: _run_lm_eval(out, tasks, bs, tmp_path) for bs in (1, 4)}

    for bs, (results, _) in runs.items():
        assert results["config"]["batch_size"] == str(bs)
        assert results["eot_token_id"] == 0 and results["max_length"] == CONTEXT
        ppl, mc = _metrics(results, "modlm_ppl"), _metrics(results, "modlm_mc")
        assert set(ppl) == {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"}
        assert set(mc) == {"acc,none", "acc_norm,none"}
        assert all(math.isfinite(v) for v in [*ppl.values(), *mc.values()]), results["results"]
        assert ppl["bits_per_byte,none"] > 0 and 0 <= mc["acc,none"] <= 1
        assert results["results"]["modlm_ppl"]["sample_len"] == 5
        assert results["results"]["modlm_mc"]["sample_len"] == 6
    # lm-eval loaded the model through the folder's shim.
    assert list((tmp_path / "home" / "modules").rglob("modeling_modlm.py"))

    # Right-padded batches, no attention mask: causal routing gives each row what it gets alone.
    (r1, s1), (r4, s4) = runs[1], runs[4]
    for task in TASKS:
        m1, m4 = _metrics(r1, task), _metrics(r4, task)
        for key in m1:
            assert math.isclose(m1[key], m4[key], rel_tol=1e-5), (task, key, m1[key], m4[key])
        assert s1[task].keys() == s4[task].keys()
        for doc_id, row in s1[task].items():
            a, b = row["filtered_resps"], s4[task][doc_id]["filtered_resps"]
            if task == "modlm_mc":
                assert [g for _, g in a] == [g for _, g in b]
                a, b = [ll for ll, _ in a], [ll for ll, _ in b]
            for x, y in zip(a, b, strict=True):
                assert math.isclose(float(x), float(y), rel_tol=1e-5, abs_tol=1e-4), \
                    (task, doc_id, a, b)
    assert _metrics(r1, "modlm_mc")["acc,none"] == _metrics(r4, "modlm_mc")["acc,none"]

    # The scores are modlm's own: one window per short document, after the NUL prefix token.
    checked = 0
    for row in s1["modlm_ppl"].values():
        data = list(row["doc"]["text"].encode("utf-8"))
        if len(data) < CONTEXT:
            ll, _ = _loglikelihood(model, [0], data)
            assert math.isclose(float(row["filtered_resps"][0]), ll, rel_tol=1e-5, abs_tol=1e-3)
            checked += 1
    assert checked == 3
    for row in s1["modlm_mc"].values():
        context = row["arguments"]["gen_args_0"]["arg_0"]
        for i, (ll_str, greedy) in enumerate(row["filtered_resps"]):
            continuation = row["arguments"][f"gen_args_{i}"]["arg_1"]
            ll, is_greedy = _loglikelihood(model, list(context.encode()),
                                           list(continuation.encode()))
            assert math.isclose(float(ll_str), ll, rel_tol=1e-5, abs_tol=1e-3)
            assert (greedy == "True") == is_greedy


@pytest.fixture(scope="module")
def exported_retrofit(tmp_path_factory):
    """(the retrofitted tiny Llama, its export folder): a checkpoint of a retrofit run."""
    pytest.importorskip("transformers")
    from support import tiny_hf_model

    from modlm import hf
    from modlm.checkpoint import save_checkpoint
    from modlm.config import RoutingConfig
    from modlm.hf.retrofit import retrofit
    from modlm.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    model = retrofit(tiny_hf_model("llama", vocab=256, max_position_embeddings=CONTEXT,
                                   initializer_range=0.2),
                     RoutingConfig(capacity=0.5)).eval()
    with torch.no_grad():
        for layer in model.routed_layers():
            layer.router.weight.mul_(3.0)
            layer.gain.fill_(0.5)
    root = tmp_path_factory.mktemp("lm_eval_retrofit")
    save_checkpoint(root / "run", step=1, model=model, optimizer_state=None,
                    trainer_state={"step": 1}, model_cfg=model.cfg, tokenizer=ByteTokenizer(),
                    run_config={"retrofit": model.run_config().to_dict()})
    return model, hf.export_checkpoint(root / "run", root / "hf")


def test_a_retrofit_export_loads_with_trust_remote_code_and_generates_identically(
        exported_retrofit):
    from transformers import AutoModelForCausalLM

    from modlm.generate import Engine
    model, out = exported_retrofit
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded.model).__name__ == "RetrofitLM"
    ids = torch.tensor([[5, 17, 33, 2, 91, 40, 7, 70]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids, mode="router").logits_BTV,
                                   rtol=0, atol=0)
    new = loaded.generate(ids, max_new_tokens=6, do_sample=False)[0, 8:].tolist()
    assert new == list(Engine(model, "router").generate(ids.tolist(), 6).tokens[0])


@pytest.mark.slow
@needs_lm_eval
def test_lm_eval_cli_scores_a_retrofit_export_alike_at_any_batch_size(exported_retrofit,
                                                                       tmp_path):
    model, out = exported_retrofit
    tasks = _task_dir(tmp_path)
    (r1, s1), (r4, s4) = (_run_lm_eval(out, tasks, bs, tmp_path) for bs in (1, 4))
    for task in TASKS:
        m1, m4 = _metrics(r1, task), _metrics(r4, task)
        assert m1 and all(math.isfinite(v) for v in m1.values())
        for key in m1:
            assert math.isclose(m1[key], m4[key], rel_tol=1e-5), (task, key, m1[key], m4[key])
    # the perplexity of a short document is the retrofit's own causal forward
    row = next(r for r in s1["modlm_ppl"].values()
               if len(r["doc"]["text"].encode("utf-8")) < CONTEXT)
    data = list(row["doc"]["text"].encode("utf-8"))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([[0] + data[:-1]]), mode="router")
                             .logits_BTV[0].double(), dim=-1)
    ll = logp.gather(1, torch.tensor(data)[:, None]).sum().item()
    assert math.isclose(float(row["filtered_resps"][0]), ll, rel_tol=1e-5, abs_tol=1e-3)
