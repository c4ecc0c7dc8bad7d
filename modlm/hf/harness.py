"""lm-evaluation-harness on local text, offline: task files written from text you have, and the
harness's own command line run on a model folder.

`write_text_tasks(out_dir, {"pydoc": text, ...})` writes, per named text, two task files of the
kinds lm-eval's standard tasks are (with their data as jsonl beside them, absolute paths, so the
folder works from any directory):

- `<prefix>_<name>_ppl`: rolling log-likelihood of whole documents, like `wikitext` (metrics
  word_perplexity, byte_perplexity, bits_per_byte);
- `<prefix>_<name>_cloze`: multiple choice, like `hellaswag`: a passage of the text and four
  continuations of the same length in words, the true one and three taken from other places in
  the same text (metrics acc, acc_norm). A model that reads the passage picks the true one; one
  that does not scores a quarter.

`run(folder, tasks_dir, tasks, work=...)` runs `lm_eval --model hf` on a transformers folder (an
`modlm export-hf` folder loads with trust_remote_code; a stock Llama folder without it) with the
hub and datasets offline and the harness's caches under `work`, and returns its results JSON
(and, with log_samples, each task's logged samples). `scores(results)` keeps the metrics.

The harness is the optional `lm-eval` package: pip install 'modlm[eval]'.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PREFIX = "modlm"
PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
CLOZE_METRICS = ("acc", "acc_norm")
CHOICES = 4

_PPL_YAML = """\
# Rolling log-likelihood of held-out documents of {name!r} (like lm-eval's wikitext); written by
# modlm.hf.harness.write_text_tasks.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
{metrics}
metadata:
  version: 1.0
"""

_CLOZE_YAML = """\
# Which of {choices} continuations follows a passage of {name!r} (like lm-eval's hellaswag): the
# true one, or one of the same length in words from elsewhere in the text; written by
# modlm.hf.harness.write_text_tasks.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
{metrics}
metadata:
  version: 1.0
"""


def _metric_list(names: tuple[str, ...], higher_is_better: bool | None) -> str:
    lines = []
    for m in names:
        lines.append(f"  - metric: {m}")
        if higher_is_better is not None:
            lines += ["    aggregation: mean",
                      f"    higher_is_better: {str(higher_is_better).lower()}"]
    return "\n".join(lines)


def _words(text: str) -> list[str]:
    """The text as words, each with the whitespace before it (so "".join gives the text back,
    less leading whitespace)."""
    return re.findall(r"\s*\S+", text.lstrip())


def ppl_documents(text: str, n_docs: int, doc_words: int) -> list[str]:
    """`n_docs` documents of `doc_words` words, spread evenly over the text."""
    words = _words(text)
    if len(words) < n_docs * doc_words:
        raise ValueError(f"the text has {len(words)} words, fewer than {n_docs} documents of "
                         f"{doc_words} words need: give more text or fewer/shorter documents")
    stride = len(words) // n_docs
    return ["".join(words[i * stride:i * stride + doc_words]).strip() for i in range(n_docs)]


def cloze_questions(text: str, n_questions: int, context_words: int, choice_words: int,
                    seed: int = 0) -> list[dict[str, Any]]:
    """`n_questions` passages of `context_words` words spread over the text, each with the
    next `choice_words` words and three other continuations of that length from elsewhere in the
    text (distinct strings; the true one at a seeded random position `label`)."""
    words = _words(text)
    span = context_words + choice_words
    if n_questions < CHOICES or len(words) < n_questions * span:
        raise ValueError(f"the text has {len(words)} words; {n_questions} questions of {span} "
                         f"words need {n_questions * span} (and at least {CHOICES} questions)")
    stride = len(words) // n_questions
    starts = [i * stride for i in range(n_questions)]
    contexts = ["".join(words[s:s + context_words]).strip() for s in starts]
    endings = ["".join(words[s + context_words:s + span]) for s in starts]
    rng = random.Random(seed)
    questions = []
    for i, (context, true) in enumerate(zip(contexts, endings)):
        others = [e for j, e in enumerate(endings) if j != i and e != true]
        distractors: list[str] = []
        for e in rng.sample(others, len(others)):
            if e not in distractors:
                distractors.append(e)
            if len(distractors) == CHOICES - 1:
                break
        if len(distractors) < CHOICES - 1:
            raise ValueError(f"the text repeats itself too much for {CHOICES} distinct "
                             f"continuations of passage {i}")
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [true] + distractors[label:]
        questions.append({"context": context, "choices": choices, "label": label})
    return questions


def write_text_tasks(out_dir: str | os.PathLike[str], texts: dict[str, str], *,
                     n_docs: int = 8, doc_words: int = 300, n_questions: int = 100,
                     context_words: int = 60, choice_words: int = 8, seed: int = 0
                     ) -> list[str]:
    """Write the perplexity and cloze tasks of each named text into out_dir (yaml + jsonl) and
    return the task names, in order. The same texts and arguments write the same files."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name, text in texts.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"task text name {name!r}: use lower-case letters, digits and _")
        kinds = (("ppl", _PPL_YAML, PPL_METRICS, None,
                  [{"text": d} for d in ppl_documents(text, n_docs, doc_words)]),
                 ("cloze", _CLOZE_YAML, CLOZE_METRICS, True,
                  cloze_questions(text, n_questions, context_words, choice_words, seed)))
        for kind, template, metrics, higher, rows in kinds:
            task = f"{PREFIX}_{name}_{kind}"
            data = out / f"{task}.jsonl"
            data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                            encoding="utf-8")
            (out / f"{task}.yaml").write_text(template.format(
                name=name, task=task, data=json.dumps(str(data)), choices=CHOICES,
                metrics=_metric_list(metrics, higher)))
            names.append(task)
    return names


def available() -> bool:
    """Whether lm-evaluation-harness is installed (pip install 'modlm[eval]')."""
    return importlib.util.find_spec("lm_eval") is not None


def offline_env(home: str | os.PathLike[str]) -> dict[str, str]:
    """The environment of a harness process: hub and datasets offline, caches under `home`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_MODULES_CACHE", "HF_DATASETS_CACHE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def command() -> list[str]:
    """The harness's command line: this interpreter's `lm_eval` script, else the one on PATH."""
    script = Path(sys.executable).with_name("lm_eval")
    if script.is_file():
        return [str(script)]
    found = shutil.which("lm_eval")
    return [found] if found else [sys.executable, "-m", "lm_eval"]


def run(folder: str | os.PathLike[str], tasks_dir: str | os.PathLike[str], tasks: list[str], *,
        work: str | os.PathLike[str], batch_size: int = 8, trust_remote_code: bool = True,
        log_samples: bool = False, timeout: float = 3600) -> tuple[dict[str, Any],
                                                                   dict[str, dict[int, Any]]]:
    """Run `lm_eval --model hf` on `folder` with the tasks in `tasks_dir`; return (its results
    JSON, {task: logged samples by doc_id} when log_samples). Raises RuntimeError with the tail
    of its output when the harness fails."""
    work = Path(work)
    results_dir = work / f"results_bs{batch_size}"
    args = f"pretrained={Path(folder).resolve()}" + (",trust_remote_code=True"
                                                     if trust_remote_code else "")
    cmd = [*command(), "--model", "hf", "--model_args", args,
           "--include_path", str(Path(tasks_dir).resolve()), "--tasks", ",".join(tasks),
           "--device", "cpu", "--batch_size", str(batch_size), "--output_path", str(results_dir)]
    if log_samples:
        cmd.append("--log_samples")
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=offline_env(work / "home"), cwd=work, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results_files = sorted(results_dir.rglob("results_*.json"))
    if not results_files:
        raise RuntimeError(f"lm_eval wrote no results under {results_dir}:\n{proc.stderr[-3000:]}")
    samples: dict[str, dict[int, Any]] = {}
    if log_samples:
        for task in tasks:
            (f,) = results_dir.rglob(f"samples_{task}_*.jsonl")
            rows = [json.loads(line) for line in f.read_text().splitlines()]
            samples[task] = {row["doc_id"]: row for row in rows}
    return json.loads(results_files[-1].read_text()), samples


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of a results JSON (filter suffix and stderr dropped)."""
    return {task: {k.split(",")[0]: v for k, v in metrics.items()
                   if "," in k and "stderr" not in k}
            for task, metrics in results["results"].items()}
