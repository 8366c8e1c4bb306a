"""python -m fastalign.tiny as a user runs it: a model directory built from a Sandbox file."""

import json
import subprocess
import sys

import pytest
import transformers

pytestmark = pytest.mark.slow


def test_cli_builds_from_a_sandbox_file(tmp_path):
    sandbox = tmp_path / "sandbox.jsonl"
    sandbox.write_text("".join(json.dumps({"query": f"### Instruction:\nQuestion {i}?\n\n### Response:",
                                           "responses": [f"Answer {i}.", "No."], "scores": [6, 2]}) + "\n"
                               for i in range(20)))
    result = subprocess.run([sys.executable, "-m", "fastalign.tiny", str(tmp_path / "m"), "--data", str(sandbox),
                             "--vocab_size", "300", "--family", "qwen3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tokenizer.decode(tokenizer("Answer 7.", add_special_tokens=False).input_ids) == "Answer 7."
    config = transformers.AutoConfig.from_pretrained(tmp_path / "m")
    assert config.vocab_size == len(tokenizer)
    assert config.model_type == "qwen3" and tokenizer.bos_token is None and tokenizer.chat_template  # Qwen style

    sandbox.write_text('{"query": "q", "responses": ["a"], "scores": [9]}\n')
    result = subprocess.run([sys.executable, "-m", "fastalign.tiny", str(tmp_path / "bad"), "--data", str(sandbox)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()
