"""python -m fastalign.tiny as a user runs it: a model directory built from a Sandbox file, from the
repository root, where transformers' model code must import beside fastalign."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_cli_builds_from_a_sandbox_file_at_the_repository_root(tmp_path):
    # Commands run from the repository root (gpu-check, `python -m ...`) have it first on sys.path.
    # transformers >= 5.25 requires and imports the hub package `kernels` with its model code (here
    # Qwen3's, which the build instantiates); a top-level `kernels/` directory of ours shadowed it
    # and broke that import. tests/unit/test_packaging.py checks the root holds no such module.
    sandbox = tmp_path / "sandbox.jsonl"
    sandbox.write_text("".join(json.dumps({"query": f"### Instruction:\nQuestion {i}?\n\n### Response:",
                                           "responses": [f"Answer {i}.", "No."], "scores": [6, 2]}) + "\n"
                               for i in range(20)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "fastalign.tiny", str(tmp_path / "m"), "--data", str(sandbox),
                             "--vocab_size", "300", "--family", "qwen3"], capture_output=True, text=True, timeout=300,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tokenizer.decode(tokenizer("Answer 7.", add_special_tokens=False).input_ids) == "Answer 7."
    config = transformers.AutoConfig.from_pretrained(tmp_path / "m")
    assert config.vocab_size == len(tokenizer)
    assert config.model_type == "qwen3" and tokenizer.bos_token is None and tokenizer.chat_template  # Qwen style
