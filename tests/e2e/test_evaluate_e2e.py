"""fastalign.evaluate as a user runs it: `python -m` with a bad record is a clean error, and two
ranks give the one-process result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.ranks import run_ranks
from helpers.records import write_jsonl

from fastalign.data import sample_data_path

pytestmark = pytest.mark.slow


def test_cli_bad_record_is_a_clean_error(tiny_dir, tmp_path):
    good = json.loads(sample_data_path().read_text().splitlines()[0])
    data = write_jsonl(tmp_path / "bad.jsonl", [good, {**good, "scores": good["scores"][:-1]}])
    proc = subprocess.run([sys.executable, "-m", "fastalign.evaluate", "--model_name_or_path", str(tiny_dir),
                           "--data_path", str(data)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "record 1" in proc.stderr and "scores" in proc.stderr


@pytest.mark.slow
def test_two_ranks_give_the_single_process_result(tiny_dir, tmp_path):
    """fastalign.evaluate's main on 2 ranks and on 1 (forked, helpers/ranks.py: what they compute is
    the point; test_cli_bad_record_is_a_clean_error starts `python -m fastalign.evaluate`)."""
    from fastalign.evaluate import main

    data = write_jsonl(tmp_path / "eval.jsonl", sample_data_path().read_text().splitlines()[:7])
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}.json"
        args = ["--model_name_or_path", tiny_dir, "--data_path", data, "--output_json", out,
                "--max_tokens_per_batch", "1500"]
        proc = run_ranks(main, args, nproc=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[ranks] = json.loads(out.read_text())
    assert outputs[2]["settings"]["world_size"] == 2
    one, two = outputs[1]["records"], outputs[2]["records"]
    assert [r["index"] for r in two] == [r["index"] for r in one] == list(range(7))
    for a, b in zip(one, two):
        assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-5)
    assert outputs[2]["metrics"]["pairwise_accuracy"] == outputs[1]["metrics"]["pairwise_accuracy"]
