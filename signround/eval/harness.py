"""Zero-shot accuracy through lm-evaluation-harness (``lm-eval``), offline, on local task files.

Tasks whose local files are in their original form (``lambada_openai``, ``piqa``, ``winogrande``) use
lm-eval's own task definitions (prompts, targets, metrics) with only the data source replaced: each is a
generated YAML that ``include``s the stock YAML and points ``dataset_path: json`` at a local file. Tasks
that exist here only in converted forms (``arc_easy``, ``arc_challenge``, ``boolq`` from llm-foundry's
ICL files, ``hellaswag`` from llama.cpp's text file) get task configs that rebuild lm-eval's prompts as
closely as the data allows; their numbers are labelled "derived data" everywhere.

The data folder (default ``../shared/data/tasks``, or ``--data-dir`` / ``$SIGNROUND_DATA/tasks``) holds:
``lambada_openai/lambada_test.jsonl``, ``piqa/valid.jsonl`` + ``valid-labels.lst``,
``winogrande/dev.jsonl``, ``_derived/llmfoundry/{arc_easy,arc_challenge,boolq}.jsonl`` and
``_derived/hellaswag_klosax/hellaswag_val_full.txt.bz2``.
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signround.calib.sources import data_dir
from signround.errors import SignRoundError
from signround.pack.packed import dequantized_weights
from signround.paths import cache_dir

log = logging.getLogger("signround")


@dataclass(frozen=True)
class TaskSource:
    """Where a task's local data lives and how it is turned into lm-eval's input."""

    name: str
    files: tuple[str, ...]  # relative to the tasks folder; the first is the main file
    derived: bool
    split: str  # the split name the task evaluates


TASKS: dict[str, TaskSource] = {
    "lambada_openai": TaskSource("lambada_openai", ("lambada_openai/lambada_test.jsonl",), False, "test"),
    "piqa": TaskSource("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), False, "validation"),
    "winogrande": TaskSource("winogrande", ("winogrande/dev.jsonl",), False, "validation"),
    "arc_easy": TaskSource("arc_easy", ("_derived/llmfoundry/arc_easy.jsonl",), True, "test"),
    "arc_challenge": TaskSource("arc_challenge", ("_derived/llmfoundry/arc_challenge.jsonl",), True, "test"),
    "boolq": TaskSource("boolq", ("_derived/llmfoundry/boolq.jsonl",), True, "validation"),
    "hellaswag": TaskSource("hellaswag", ("_derived/hellaswag_klosax/hellaswag_val_full.txt.bz2",), True, "validation"),
}


def tasks_dir(explicit: str | Path | None = None) -> Path:
    """The task files' folder: ``explicit``'s ``tasks/`` when it has one (``--data-dir`` names the data
    folder), else ``explicit`` itself (a folder of task files); by default the first data folder's ``tasks/``
    (``$SIGNROUND_DATA`` or ``../shared/data``)."""
    if explicit:
        folder = Path(explicit).expanduser()
        return folder / "tasks" if (folder / "tasks").is_dir() else folder
    return data_dir() / "tasks"


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise SignRoundError(f"unknown task(s) {unknown or spec!r}; choose from {', '.join(TASKS)}")
    return names


# ---------------------------------------------------------------------------------------------------------
# Local data -> JSON lines lm-eval can read with dataset_path "json"


def _prepared(source: TaskSource, root: Path, out: Path) -> Path:
    """Path of a JSON-lines file for ``source`` (converted into ``out`` where needed)."""
    paths = [root / f for f in source.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SignRoundError(f"task {source.name}: data file {missing[0]} not found; pass --data-dir")
    if source.name == "piqa":
        rows = [json.loads(line) for line in paths[0].read_text().splitlines() if line.strip()]
        labels = [int(x) for x in paths[1].read_text().split()]
        if len(rows) != len(labels):
            raise SignRoundError(f"piqa: {len(rows)} questions but {len(labels)} labels")
        return _write_jsonl(out / "piqa.jsonl", [{**r, "label": lab} for r, lab in zip(rows, labels, strict=True)])
    if source.name == "hellaswag":
        return _write_jsonl(out / "hellaswag.jsonl", _hellaswag_rows(paths[0]))
    return paths[0]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def _clean_hellaswag(text: str) -> str:
    """lm-eval's HellaSwag normalization: WikiHow bracket markers out, double spaces folded."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_rows(path: Path) -> list[dict]:
    """llama.cpp's HellaSwag text: 6 lines per item (context, gold label, 4 endings)."""
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").splitlines()
    if len(lines) % 6:
        raise SignRoundError(f"{path} has {len(lines)} lines, not a multiple of 6; the file is corrupt")
    return [
        {
            "query": _clean_hellaswag(lines[i]),
            "choices": [_clean_hellaswag(e) for e in lines[i + 2 : i + 6]],
            "gold": int(lines[i + 1]),
        }
        for i in range(0, len(lines), 6)
    ]


# ---------------------------------------------------------------------------------------------------------
# Task configs


def _stock_yaml(task: str) -> Path:
    import lm_eval

    rel = {
        "lambada_openai": "lambada/lambada_openai.yaml",
        "piqa": "piqa/piqa.yaml",
        "winogrande": "winogrande/default.yaml",
    }[task]
    return Path(lm_eval.__file__).parent / "tasks" / rel


_DERIVED_PROMPTS: dict[str, dict[str, Any]] = {
    # ARC: the ICL query is already "Question: <stem>", as in lm-eval's "Question: {{question}}\nAnswer:".
    "arc": {
        "doc_to_text": "{{query.strip()}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metrics": ["acc", "acc_norm"],
    },
    # BoolQ: lm-eval writes "{{passage}}\nQuestion: {{question}}?\nAnswer:"; the ICL query carries a
    # "Passage: " prefix that lm-eval's prompt does not have, so it is dropped.
    "boolq": {
        "doc_to_text": "{{query.strip()[9:] if query.startswith('Passage: ') else query.strip()}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metrics": ["acc"],
    },
    "hellaswag": {
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metrics": ["acc", "acc_norm"],
    },
}


def task_config(name: str, data_file: Path) -> dict[str, Any]:
    """The lm-eval task config (as a YAML-able dict) for task ``name`` reading ``data_file``."""
    source = TASKS[name]
    data = {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {source.split: str(data_file)}},
        "training_split": None,
        "validation_split": None,
        "test_split": None,
        "fewshot_split": None,
    }
    data["test_split" if source.split == "test" else "validation_split"] = source.split
    if not source.derived:
        return {"include": str(_stock_yaml(name)), "task": name, **data}
    prompt = _DERIVED_PROMPTS["arc" if name.startswith("arc") else name]
    return {
        "task": name,
        "output_type": "multiple_choice",
        **data,
        "doc_to_text": prompt["doc_to_text"],
        "doc_to_choice": prompt["doc_to_choice"],
        "doc_to_target": prompt["doc_to_target"],
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in prompt["metrics"]],
        "metadata": {"version": 1.0, "signround_derived_data": True},
    }


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class TaskScore:
    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    samples: int
    derived: bool
    perplexity: float | None = None


def _offline() -> None:
    """lm-eval and datasets must never reach the network for local files."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: str | list[str],
    limit: int | None = None,
    data: str | Path | None = None,
    batch_size: int = 8,
) -> list[TaskScore]:
    """Zero-shot scores of ``model`` (float or quantized, in memory) on local task files.

    Args:
        model, tokenizer: an HF causal LM (any signround model) and its tokenizer.
        tasks: names from :data:`TASKS` (list or comma-separated string).
        limit: evaluate only the first ``limit`` items of each task.
        data: the tasks folder (default ``../shared/data/tasks``).
        batch_size: sequences per forward pass.
    """
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise SignRoundError(f"--limit must be >= 1, got {limit}")
    root = tasks_dir(data)
    _offline()
    try:
        import yaml
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SignRoundError("zero-shot tasks need lm-eval: pip install 'signround[eval]'") from None
    prepared = cache_dir() / "tasks"
    with tempfile.TemporaryDirectory(prefix="signround-tasks-") as tmp:
        for name in names:
            cfg = task_config(name, _prepared(TASKS[name], root, prepared))
            (Path(tmp) / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        manager = TaskManager(include_path=tmp, include_defaults=False)
        # lm-eval hands config.quantization_config to transformers, which does not know signround's
        # (the model is already quantized in memory and needs no loader), so hide it while lm-eval runs.
        qc = getattr(model.config, "quantization_config", None)
        if qc is not None:
            del model.config.quantization_config
        try:
            with dequantized_weights(model):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
                out = simple_evaluate(
                    model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=1000
                )
        finally:
            if qc is not None:
                model.config.quantization_config = qc
    scores = []
    for name in names:
        r = out["results"][name]
        scores.append(
            TaskScore(
                task=name,
                acc=r["acc,none"],
                acc_stderr=_num(r.get("acc_stderr,none")),
                acc_norm=_num(r.get("acc_norm,none")),
                acc_norm_stderr=_num(r.get("acc_norm_stderr,none")),
                samples=int(out["n-samples"][name]["effective"]),
                derived=TASKS[name].derived,
                perplexity=_num(r.get("perplexity,none")),
            )
        )
    return scores


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def format_scores(scores: list[TaskScore]) -> str:
    """A Markdown table with the average accuracy; derived-data tasks are marked."""
    lines = ["| task | acc | acc_norm | stderr (acc) | n | data |", "|---|---:|---:|---:|---:|---|"]
    for s in scores:
        norm = "" if s.acc_norm is None else f"{s.acc_norm:.4f}"
        err = "" if s.acc_stderr is None else f"{s.acc_stderr:.4f}"
        lines.append(
            f"| {s.task} | {s.acc:.4f} | {norm} | {err} | {s.samples} | {'derived data' if s.derived else 'original'} |"
        )
    avg = sum(s.acc for s in scores) / len(scores)
    lines.append(f"| **average** | {avg:.4f} | | | | |")
    return "\n".join(lines)
