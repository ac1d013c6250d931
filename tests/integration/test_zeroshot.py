"""Zero-shot tasks through lm-eval on the local task files, with the network disabled."""

import json
import socket

import pytest

from signround.cli import main
from signround.eval.harness import TASKS, evaluate_tasks, format_scores, task_config, tasks_dir
from tests.conftest import make_model, quantize_tiny


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_two_tasks_offline(no_network, tokenizer):
    scores = evaluate_tasks(make_model("llama"), tokenizer, "piqa,arc_easy", limit=3)
    assert [s.task for s in scores] == ["piqa", "arc_easy"]
    for s in scores:
        assert s.samples == 3 and 0.0 <= s.acc <= 1.0 and s.acc_norm is not None
    assert [s.derived for s in scores] == [False, True]
    table = format_scores(scores)
    assert "derived data" in table and "average" in table


def test_quantized_model_in_memory_and_saved(no_network, tokenizer, tmp_path):
    import signround

    qmodel = quantize_tiny(tokenizer)
    a = evaluate_tasks(qmodel, tokenizer, "winogrande", limit=2)
    assert qmodel.config.quantization_config["quant_method"] == "signround"  # restored after lm-eval ran
    signround.save(qmodel, tokenizer, tmp_path / "q")
    model, tok = signround.load_model(str(tmp_path / "q"))
    b = evaluate_tasks(model, tok, "winogrande", limit=2)
    assert a[0].acc == b[0].acc and a[0].samples == 2


def test_prompts_follow_lm_eval(tmp_path):
    """Rendered prompts: stock lm-eval ones on original data, rebuilt ones on derived data."""
    import yaml
    from lm_eval.tasks import TaskManager

    from signround.eval.harness import _prepared
    from signround.paths import cache_dir

    for name in TASKS:
        cfg = task_config(name, _prepared(TASKS[name], tasks_dir(), cache_dir() / "tasks"))
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False).load(list(TASKS))["tasks"]
    counts = {name: len(list(task.eval_docs)) for name, task in tasks.items()}
    assert counts == {
        "lambada_openai": 5153,
        "piqa": 1838,
        "winogrande": 1267,
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "boolq": 3270,
        "hellaswag": 10042,
    }
    piqa = tasks["piqa"]
    doc = next(iter(piqa.eval_docs))
    assert piqa.doc_to_text(doc).startswith("Question: How do I ready a guinea pig cage")
    assert piqa.doc_to_text(doc).endswith("\nAnswer:")
    boolq = tasks["boolq"]
    text = boolq.doc_to_text(next(iter(boolq.eval_docs)))
    assert not text.startswith("Passage:") and "\nQuestion: " in text and text.endswith("?\nAnswer:")
    hs = tasks["hellaswag"]
    doc = next(iter(hs.eval_docs))
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. he"
    assert len(hs.doc_to_choice(doc)) == 4 and hs.doc_to_target(doc) == 3


def test_cli_tasks_json(no_network, capsys, tmp_path, model_dir):
    out = tmp_path / "z.json"
    code = main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--tasks",
            "winogrande,boolq",
            "--limit",
            "2",
            "--json",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert [t["task"] for t in data["tasks"]] == ["winogrande", "boolq"] and "ppl" not in data
    assert data["tasks"][1]["derived"] is True
    code = main(["eval", "--model", str(model_dir), "--tasks", "mmlu"])
    assert code == 2 and "unknown task" in capsys.readouterr().err
