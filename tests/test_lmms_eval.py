"""The lmms-eval plugin: lmms-eval itself, offline, scores a checkpoint exactly as `tokred eval` does."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lmms_eval")

import tokred  # noqa: E402
from tokred.cli import main  # noqa: E402
from tokred.eval import STOCK, evaluate, grid  # noqa: E402
from tokred.eval.lmms_run import model_args  # noqa: E402
from tokred.eval.lmms_tasks import TASKS, include_path  # noqa: E402
from tokred.zoo import available, build, card, load  # noqa: E402

LIMIT = 12


@pytest.fixture(autouse=True)
def offline(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def checkpoints() -> list[tuple[str, str]]:
    """(checkpoint, local task) pairs: each trained checkpoint on its tasks, else a random build on both."""
    trained = [(name, task) for name in available() for task in card(name)["tasks"]]
    return trained or [("random-qwen2_5_vl", "shapes"), ("random-qwen2_5_vl", "motion")]


def lmms_run(path: str, setting, task: str) -> tuple[float, list[str], object]:
    """lmms-eval's accuracy, its answer per question, and the model its plugin patched."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    lm = get_model("tokred").create_from_arg_string(f"{model_args(path, setting)},device=cpu", {"batch_size": 1})
    model = lm._model  # lmms-eval deletes it from the wrapper when the run ends
    tasks = TaskManager(include_path=str(include_path(LIMIT)), include_defaults=False)
    name = TASKS[task]
    result = simple_evaluate(model=lm, tasks=[name], limit=LIMIT, task_manager=tasks, bootstrap_iters=0)
    samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
    answers = [s["filtered_resps"][0].strip() for s in samples]
    return result["results"][name]["exact_match,none"], answers, model


@pytest.mark.parametrize(("name", "task"), checkpoints())
@pytest.mark.parametrize("recipe", ["none", "fastv-25", "random-25"])
def test_lmms_eval_with_the_plugin_matches_tokred_eval(name, task, recipe, tmp_path):
    # the random build takes 448 px images whole, as lmms-eval's Qwen class does
    path = str(build("qwen2_5_vl", tmp_path / "q", image_size=448) if name.startswith("random-") else name)
    setting = STOCK if recipe == "none" else grid(recipes=[recipe])[1]
    accuracy, answers, lmms_model = lmms_run(path, setting, task)
    kept = tokred.stats(lmms_model).vision_tokens
    assert kept["input"] == [kept["input"][0]] and list(kept.values())[-1][0] == (
        kept["input"][0] if recipe == "none" else (kept["input"][0] + 2) // 4
    )

    model, processor = load(path)
    (row,) = evaluate(model, processor, [setting], [task], limit=LIMIT, batch_size=4, progress=False)
    assert all(answers)
    assert kept["input"][0] == row.vision_tokens_in and answers == row.answers and accuracy == row.accuracy


def test_accelerate_data_parallel_gives_the_single_process_answers(tmp_path):
    """lmms-eval's several-GPU path, `accelerate launch --multi_gpu` (gloo on a CPU-only machine): two ranks each
    load and patch the model and answer half the questions; the gathered answers are `tokred eval`'s."""
    setting = grid(recipes=["fastv-25"])[1]
    out = tmp_path / "out"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", str(port), "-m", "lmms_eval", "--model", "tokred"]
    launch += ["--model_args", f"{model_args('shapes-llava', setting)},device=cpu", "--tasks", "tokred_shapes"]
    launch += ["--include_path", str(include_path(LIMIT)), "--limit", str(LIMIT), "--batch_size", "1"]
    launch += ["--output_path", str(out), "--log_samples"]
    done = subprocess.run(
        launch, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "Running on rank 1" in log, log[-3000:]
    (samples,) = out.rglob("*_samples_tokred_shapes.jsonl")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    model, processor = load("shapes-llava")
    (row,) = evaluate(model, processor, [setting], ["shapes"], limit=LIMIT, batch_size=1, progress=False)
    assert [r["doc_id"] for r in rows] == list(range(LIMIT))
    assert [r["filtered_resps"].strip() for r in rows] == row.answers


def test_unknown_base_is_explained():
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="base=<lmms-eval model>, one of: llava_hf, qwen2_vl, qwen2_5_vl, qwen3_vl"):
        get_model("tokred").create_from_arg_string("base=blip2,pretrained=x", {})
    with pytest.raises(ValueError, match="'llava_onevision' class runs the original LLaVA-NeXT code.*base=llava_hf"):
        get_model("tokred").create_from_arg_string("base=llava_onevision,pretrained=x", {})


def test_a_base_of_another_family_is_refused():
    from lmms_eval.models import get_model

    with pytest.raises(
        ValueError, match="shapes-llava is a 'llava' checkpoint: use base=llava_hf, not base=qwen2_5_vl"
    ):
        get_model("tokred").create_from_arg_string("base=qwen2_5_vl,pretrained=shapes-llava,device=cpu", {})


@pytest.mark.parametrize(("extra", "dtype"), [("", torch.float32), (",dtype=bfloat16", torch.bfloat16)])
def test_the_plugin_on_the_cpu_loads_float32_unless_told(tmp_path, extra, dtype):
    """lmms-eval's Qwen classes load bfloat16, which changes a few answers from `tokred eval`'s float32 ones."""
    from lmms_eval.models import get_model

    path = build("qwen2_5_vl", tmp_path / "q")
    lm = get_model("tokred").create_from_arg_string(f"base=qwen2_5_vl,pretrained={path},device=cpu{extra}", {})
    assert lm._model.dtype == dtype and lm._model.device == torch.device("cpu")


def test_an_unknown_kv_scheme_is_refused(tmp_path):
    from lmms_eval.models import get_model

    path = build("qwen2_5_vl", tmp_path / "q")
    with pytest.raises(ValueError, match="unknown kv scheme 'zipcache'; kv schemes are: none, int8, kivi, vidkv"):
        get_model("tokred").create_from_arg_string(f"base=qwen2_5_vl,pretrained={path},kv=zipcache,device=cpu", {})


def test_backend_runs_lmms_eval_tasks_through_the_plugin(tmp_path, capsys):
    path = build("qwen2_5_vl", tmp_path / "q")
    out = tmp_path / "out"
    args = ["eval", "--backend", "lmms-eval", "--model", str(path), "--recipes", "random-25", "--limit", "2"]
    main([*args, "--batch-size", "1", "--device", "cpu", "--out", str(out)])
    rows = json.loads((out / "lmms_results.json").read_text())["rows"]
    assert [(r["task"], r["setting"]) for r in rows] == [("tokred_shapes", "stock"), ("tokred_shapes", "random-25")]
    assert all(0.0 <= r["exact_match,none"] <= 1.0 for r in rows)
    assert "| tokred_shapes | random-25 | exact_match,none |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("mmee", r"unknown lmms-eval task 'mmee'; closest: mme"),
        ("mme", r"task 'mme' reads the Hugging Face dataset 'lmms-lab\S*MME', which is not available here .*looked in"),
    ],
)
def test_backend_explains_unknown_tasks_and_missing_data(tmp_path, capsys, task, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--backend", "lmms-eval", "--model", str(tmp_path), "--tasks", task, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_entry_point_resolves_whichever_module_is_imported_first():
    """Importing the plugin first makes lmms-eval build its registry mid-import; `tokred` must still be in it."""
    code = "import tokred.eval.lmms; from lmms_eval.models import get_model; print(get_model('tokred').__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "Tokred", done.stderr[-2000:]
    assert "Failed to load model entry-point manifests" not in done.stderr
