"""fastalign.demo: the quick end-to-end run leaves a loadable model, metrics and a before/after table."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from fastalign.data import sample_data_path
from fastalign.demo import split_sample

pytestmark = pytest.mark.slow


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    lines = [line for line in sample_data_path().read_text().splitlines() if line.strip()]
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    train, held, num_train = split_sample(sample_data_path(), first, 40, seed=0)
    split_sample(sample_data_path(), second, 40, seed=0)
    assert held.read_text() == (second / "heldout.jsonl").read_text()
    train_lines, held_lines = train.read_text().splitlines(), held.read_text().splitlines()
    assert len(held_lines) == 40 and num_train == len(train_lines) == len(lines) - 40
    assert sorted(train_lines + held_lines) == sorted(lines)
    assert not set(train_lines) & set(held_lines)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # pointed at another family with one flag (the default, llama, runs the same code with another class)
    proc = subprocess.run([sys.executable, "-m", "fastalign.demo", "--quick", "--output_dir", str(out),
                           "--family", "qwen2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    printed = proc.stdout

    results = json.loads((out / "demo_results.json").read_text())
    before, after = results["before"], results["after"]
    assert before["num_records"] == after["num_records"] == 12
    # the printed table carries the same numbers as the results file
    row = re.search(r"pairwise accuracy\s+([0-9.]+)\s+([0-9.]+)", printed)
    assert row, printed
    assert float(row.group(1)) == pytest.approx(before["pairwise_accuracy"], abs=5e-4)
    assert float(row.group(2)) == pytest.approx(after["pairwise_accuracy"], abs=5e-4)
    assert before["mean_loglik"] != after["mean_loglik"]  # the model it evaluated after is the trained one
    assert "python -m fastalign.plot" in printed and "after:" in printed

    trained = out / "trained"
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[-1] == 6
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained)
    assert type(model).__name__ == "Qwen2ForCausalLM" and results["settings"]["family"] == "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(trained)
    ids = tokenizer("### Instruction:\nHi\n\n### Response:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
