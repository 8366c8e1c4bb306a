"""Resume checks through the command line: edited data, another model_max_length, a damaged checkpoint,
another vocabulary."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers.checkpoints import edit_json, link_shard, reseal, setting
from helpers.training import common, metrics, ok, train_in_process

from fastalign import checkpoint as ckpt

pytestmark = pytest.mark.slow

STATE = ckpt.STATE_FILE


FLAGS = dict(per_device_train_batch_size=2, save_strategy="steps", save_steps=1)


def snapshot(root: Path) -> dict[str, str]:
    """Every path below `root` -> digest of its bytes (or the link's target)."""
    return {p.relative_to(root).as_posix(): (f"-> {p.readlink()}" if p.is_symlink() else
                                              hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def refused(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


@pytest.fixture(scope="module")
def two_steps(tiny, tmp_path_factory):
    """An output dir with checkpoint-1 and checkpoint-2, trained on its own copy of the data."""
    model, data = tiny
    root = tmp_path_factory.mktemp("two")
    shutil.copy(data, root / "data.jsonl")
    ok(train_in_process(common(model, root / "data.jsonl", root / "out", max_steps=2, **FLAGS)))
    return root


@pytest.fixture
def run_copy(two_steps, tmp_path):
    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    return tmp_path / "data.jsonl", tmp_path / "out"


@pytest.mark.slow
def test_resume_on_edited_data_is_refused_and_accepted_with_allow_data_change(tiny, two_steps, run_copy):
    model, _ = tiny
    data, out = run_copy
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same records, shuffled
    before = snapshot(out)
    line = refused(train_in_process(common(model, data, out, max_steps=3, resume_from_checkpoint="auto", **FLAGS)))
    assert f"--data_path: other contents (checkpoint: {two_steps / 'data.jsonl'}, sha256 " in line
    assert f"now: {data}, sha256 " in line and "--allow_data_change True" in line
    assert snapshot(out) == before

    result = ok(train_in_process(common(model, data, out, max_steps=3, resume_from_checkpoint="auto",
                                 allow_data_change=True, **FLAGS)))
    assert "--allow_data_change: resuming" in result.stderr and f"resumed from {out / 'checkpoint-2'}" in result.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["inputs"]["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()  # the new data


@pytest.mark.slow
def test_resume_with_another_model_max_length_is_refused(tiny, run_copy):
    model, _ = tiny
    data, out = run_copy
    flags = {**FLAGS, "model_max_length": 96}
    line = refused(train_in_process(common(model, data, out, max_steps=3, resume_from_checkpoint="auto", **flags)))
    assert "--model_max_length (checkpoint 128, now 96)" in line


def negative_step(path: Path) -> str:
    edit_json(path, STATE, setting("step", -4))
    return "field 'step' must be in [0, "


def string_step(path: Path) -> str:
    edit_json(path, STATE, setting("step", "2"))
    return "field 'step' must be an integer, got '2'"


def huge_step(path: Path) -> str:
    edit_json(path, STATE, setting("step", 10**30))
    return "field 'step' must be in [0, 9223372036854775807], got 1000000000000000000000000000000"


def symlinked_shard(path: Path) -> str:
    link_shard(path, path.parent.parent / "elsewhere.bin")
    reseal(path)
    return f"{path / '__0_0.distcp'} is a symbolic link"


@pytest.mark.slow
@pytest.mark.parametrize("fault", [negative_step, string_step, huge_step, symlinked_shard],
                         ids=["negative-step", "string-step", "huge-step", "symlinked-shard"])
def test_damaged_checkpoint_is_an_error_line_and_stays_intact(tiny, run_copy, fault):
    model, _ = tiny
    data, out = run_copy
    expected = fault(out / "checkpoint-2")
    before = snapshot(out)
    line = refused(train_in_process(common(model, data, out, max_steps=3,
                                    resume_from_checkpoint=out / "checkpoint-2", **FLAGS)))
    assert line.startswith(f"error: --resume_from_checkpoint: {out / 'checkpoint-2'} does not verify")
    assert expected in line
    assert snapshot(out) == before


@pytest.mark.slow
def test_resume_with_a_model_of_another_vocabulary_is_an_error_line(tiny, run_copy, tmp_path):
    from fastalign.data import sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    model, _ = tiny
    data, out = run_copy
    other = build_tiny_llama(tmp_path / "other", sandbox_texts(sample_data_path()), vocab_size=384, hidden_size=64,
                             num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                             max_position_embeddings=256)
    before = snapshot(out)
    line = refused(train_in_process(common(other, data, out, max_steps=3, resume_from_checkpoint="auto", **FLAGS)))
    assert "the tokenizer files of --model_name_or_path: other contents" in line
    line = refused(train_in_process(common(other, data, out, max_steps=3, resume_from_checkpoint="auto",
                                    allow_data_change=True, **FLAGS)))
    vocab = [json.loads((path / "config.json").read_text())["vocab_size"] for path in (model, other)]
    assert vocab[0] != vocab[1]
    assert "holds the tensors of another model" in line
    assert f"model.llama.embed_tokens.weight: checkpoint [{vocab[0]}, 64], this model [{vocab[1]}, 64]" in line
    assert snapshot(out) == before
