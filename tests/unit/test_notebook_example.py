"""The evaluation guide's notebook example runs as printed, and evaluate_model takes plain dicts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fastalign.data import load_records, sample_data_path
from fastalign.errors import DataError
from fastalign.evaluate import evaluate_model
from fastalign.model import Llama
from fastalign.model_dir import load_tokenizer
from fastalign.tiny import build_tiny_llama, sandbox_texts

REPO = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=384, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
             max_position_embeddings=256)


def notebook_example() -> str:
    """The python block of docs/evaluation.md's 'In a notebook' section."""
    section = REPO.joinpath("docs", "evaluation.md").read_text().split("\n## In a notebook\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A stand-in for `make demo`'s output: two differently seeded tiny models and held-out records."""
    root = tmp_path_factory.mktemp("nb")
    out = root / "demo_output"
    texts = sandbox_texts(sample_data_path())
    build_tiny_llama(out / "tiny-llama", texts, seed=0, **SHAPE)
    build_tiny_llama(out / "trained", texts, seed=1, **SHAPE)
    lines = sample_data_path().read_text().splitlines()[:6]
    (out / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_notebook_example_prints_each_checkpoints_metrics(demo_dir, monkeypatch, capsys):
    code = notebook_example()
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(demo_dir)
    exec(compile(code, "docs/evaluation.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2
    # oracle: the same evaluation over Record objects loaded from the file (+ the appended record)
    extra = {"query": "### Instruction:\nCan I skip sleep to study?\n\n### Response:", "scores": [7, 2],
             "responses": ["Sleep helps memory; study earlier instead.", "Sure, sleep is optional."]}
    path = demo_dir / "demo_output" / "heldout.jsonl"
    with_extra = demo_dir / "with_extra.jsonl"
    with_extra.write_text(path.read_text() + json.dumps(extra) + "\n")
    records = load_records(with_extra).records
    for line, name in zip(printed, ("tiny-llama", "trained")):
        model_dir = demo_dir / "demo_output" / name
        m = evaluate_model(Llama.from_pretrained(model_dir), load_tokenizer(model_dir), records,
                           model_max_length=256)["metrics"]
        assert line == (f"demo_output/{name}: pairwise {m['pairwise_accuracy']:.3f}, "
                        f"tau {m['kendall_tau']:+.3f}")
    assert printed[0] != printed[1]  # two different models were scored


def test_dicts_and_records_give_the_same_report(demo_dir):
    model_dir = demo_dir / "demo_output" / "tiny-llama"
    model, tok = Llama.from_pretrained(model_dir), load_tokenizer(model_dir)
    path = demo_dir / "demo_output" / "heldout.jsonl"
    dicts = [json.loads(line) for line in path.read_text().splitlines()]
    assert evaluate_model(model, tok, dicts) == evaluate_model(model, tok, load_records(path).records)


@pytest.mark.parametrize("bad,needle", [
    ({"query": "q", "responses": ["a", "b"], "scores": [7, 9]}, "record 1, field 'scores[1]'"),
    ({"query": "q", "responses": ["a"]}, "record 1, field 'scores': missing"),
    ("not a dict", "record 1: record is a JSON string"),
])
def test_a_bad_dict_is_a_data_error_naming_its_index(demo_dir, bad, needle):
    model_dir = demo_dir / "demo_output" / "tiny-llama"
    good = {"query": "q", "responses": ["a", "b"], "scores": [7, 1]}
    with pytest.raises(DataError, match=re.escape(needle)):
        evaluate_model(Llama.from_pretrained(model_dir), load_tokenizer(model_dir), [good, bad])
