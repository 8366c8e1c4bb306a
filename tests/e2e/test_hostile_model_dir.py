"""A hostile model directory: nothing in it runs, and damaged safetensors are refused.

Custom code: a tokenizer_config.json (or config.json) whose `auto_map` names a Python file of the
directory makes transformers ask "run the custom code? [y/N]" and read the answer from standard
input; the file here creates a marker when imported. With "y" on standard input, train, evaluate
and generate must exit 2 with an `error:` naming the file and its auto_map, the marker absent:
evaluate and generate as `python -m` with "y" piped in, train's main in this process with "y" as
sys.stdin (what transformers' prompt reads; `python -m fastalign.train` runs in other tests).

Safetensors: headers whose offsets overlap, are negative or run past the file, or whose length is
huge, are refused as a ModelError naming the file (in-process), and as `error:` + exit 2 through
the command line (evaluate's main in this process).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.commands import command_in_process
from helpers.training import REPO, common

from fastalign import model_dir
from fastalign.errors import ModelError
from fastalign.hf_config import LlamaConfig
from fastalign.hf_weights import SAFETENSORS_SINGLE, CheckpointReader
from fastalign.model import Llama
from fastalign.model_dir import load_tokenizer

pytestmark = pytest.mark.slow

# -- custom code -------------------------------------------------------------------------------


def plant_code(directory: Path, marker: Path, config_file: str = "tokenizer_config.json") -> Path:
    """Give `config_file` of `directory` an auto_map naming evil_code.py, which writes `marker`
    when imported; returns the file changed."""
    (directory / "evil_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the model directory ran code')\n"
        "from transformers import PreTrainedTokenizerFast, LlamaConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        "class EvilConfig(LlamaConfig):\n    pass\n")
    file = directory / config_file
    settings = json.loads(file.read_text())
    if config_file == "tokenizer_config.json":
        settings.pop("tokenizer_class", None)  # transformers then needs the auto_map's class
        settings["auto_map"] = {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}
    else:
        settings["auto_map"] = {"AutoConfig": "evil_code.EvilConfig"}
    file.write_text(json.dumps(settings))
    return file


@pytest.fixture
def hostile(tiny, tmp_path):
    """(a copy of the tiny model whose tokenizer_config.json asks for custom code, the marker
    that code would write, the data file)."""
    model, data = tiny
    directory = shutil.copytree(model, tmp_path / "model")
    marker = tmp_path / "MARKER"
    plant_code(directory, marker)
    return directory, marker, data


YES = "y\n" * 20  # answers every prompt


@pytest.fixture(scope="module")
def piped_yes(tiny, tmp_path_factory) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """command -> (its hostile model copy, its marker, `python -m command` on that copy with "y"
    piped to standard input), for evaluate and generate, both started at once (their imports
    overlap); transformers' module cache (where it would copy the directory's code) beside each."""
    model, data = tiny
    started = {}
    for module, args in (("fastalign.evaluate", ["--data_path", data]), ("fastalign.generate", ["--prompt", "hi"])):
        root = tmp_path_factory.mktemp(module.rsplit(".", 1)[1])
        directory = shutil.copytree(model, root / "model")
        marker = root / "MARKER"
        plant_code(directory, marker)
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HOME=str(root / "hf_home"))
        proc = subprocess.Popen([sys.executable, "-m", module, "--model_name_or_path", str(directory),
                                 *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        proc.stdin.write(YES)  # at once, as a pipe from `yes`; communicate() closes it
        proc.stdin.flush()
        started[module] = directory, marker, proc
    runs = {}
    try:
        for module, (directory, marker, proc) in started.items():
            stdout, stderr = proc.communicate(timeout=300)
            runs[module] = directory, marker, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for _, _, proc in started.values():  # a timed-out one is not left running
            proc.kill()
            proc.wait()
    return runs


@pytest.fixture
def yes_in_process(tmp_path, monkeypatch):
    """`command_in_process(module, args)` with "y" as standard input; transformers' module cache
    under tmp_path (for the subprocess it is with CUDA, and for this process's transformers)."""
    from transformers import dynamic_module_utils

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_home" / "modules"))
    return lambda module, args: command_in_process(module, args, stdin=YES)


def assert_refused_without_running(proc: subprocess.CompletedProcess, file: Path, marker: Path) -> None:
    assert not marker.exists(), "the model directory's code ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "[y/N]" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error and str(file) in error[-1] and "auto_map" in error[-1] and "evil_code.EvilTokenizer" in error[-1]


def test_train_with_yes_on_stdin_runs_no_code_from_the_model_dir(hostile, tmp_path, yes_in_process):
    directory, marker, data = hostile
    proc = yes_in_process("fastalign.train", common(directory, data, tmp_path / "out", max_steps=1))
    assert_refused_without_running(proc, directory / "tokenizer_config.json", marker)


def test_evaluate_with_yes_on_stdin_runs_no_code_from_the_model_dir(piped_yes):
    directory, marker, proc = piped_yes["fastalign.evaluate"]
    assert_refused_without_running(proc, directory / "tokenizer_config.json", marker)


def test_generate_with_yes_on_stdin_runs_no_code_from_the_model_dir(piped_yes):
    directory, marker, proc = piped_yes["fastalign.generate"]
    assert_refused_without_running(proc, directory / "tokenizer_config.json", marker)


def test_config_auto_map_is_refused_by_every_loader(tiny, tmp_path):
    directory = shutil.copytree(tiny[0], tmp_path / "model")
    marker = tmp_path / "MARKER"
    config = plant_code(directory, marker, "config.json")
    for load in (load_tokenizer, LlamaConfig.from_pretrained, Llama.from_pretrained):
        with pytest.raises(ModelError, match="auto_map") as refused:
            load(directory)
        assert str(config) in str(refused.value) and "evil_code.EvilConfig" in str(refused.value)
    assert not marker.exists()


def test_auto_map_beside_a_standard_tokenizer_class_is_refused(tiny, tmp_path):
    """transformers would pick the standard class here; the directory still asks for its own code."""
    directory = shutil.copytree(tiny[0], tmp_path / "model")
    file = directory / "tokenizer_config.json"
    settings = json.loads(file.read_text())
    file.write_text(json.dumps({**settings, "auto_map": ["evil_code.EvilTokenizer", None]}))  # the older list form
    with pytest.raises(ModelError, match="auto_map") as refused:
        load_tokenizer(directory)
    assert str(file) in str(refused.value)


def test_transformers_is_asked_without_remote_code_whatever_stdin_holds(hostile, monkeypatch):
    """The second line of defence: were the auto_map check skipped, AutoTokenizer gets
    trust_remote_code=False, so a "y" on standard input is never read."""
    directory, marker, _ = hostile
    monkeypatch.setattr(model_dir, "refuse_custom_code", lambda directory: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 20))
    monkeypatch.setenv("HF_HOME", str(marker.parent / "hf_home"))
    with pytest.raises(ModelError, match="cannot load a tokenizer"):
        load_tokenizer(directory)
    assert not marker.exists()


# -- damaged safetensors -----------------------------------------------------------------------


def rewrite_header(file: Path, change) -> None:
    """Apply `change(header)` to a safetensors file's JSON header, keeping the tensor bytes."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def overlap_two_norms(header: dict) -> None:
    """The post-attention norm's offsets point at the input norm's bytes (same size)."""
    header["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = \
        header["model.layers.0.input_layernorm.weight"]["data_offsets"]


def negative_offset(header: dict) -> None:
    start, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [start - 10**6, end - 10**6]


def past_the_end(header: dict) -> None:
    _, info = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda item: item[1]["data_offsets"][1])
    start, end = info["data_offsets"]
    info["data_offsets"] = [start + 4096, end + 4096]


def shape_larger_than_its_bytes(header: dict) -> None:
    header["model.norm.weight"]["shape"] = [10**6]


def huge_header_length(file: Path) -> None:
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


DAMAGE = {
    "overlapping offsets": lambda file: rewrite_header(file, overlap_two_norms),
    "negative offset": lambda file: rewrite_header(file, negative_offset),
    "offset past the end of the file": lambda file: rewrite_header(file, past_the_end),
    "shape larger than its bytes": lambda file: rewrite_header(file, shape_larger_than_its_bytes),
    "huge header length": huge_header_length,
    "truncated file": lambda file: file.write_bytes(file.read_bytes()[:-100]),
}


@pytest.fixture
def damaged(tiny, tmp_path, request):
    directory = shutil.copytree(tiny[0], tmp_path / "model")
    DAMAGE[request.param](directory / SAFETENSORS_SINGLE)
    return directory


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_damaged_safetensors_is_refused_naming_the_file(damaged):
    file = damaged / SAFETENSORS_SINGLE
    for load in (CheckpointReader, Llama.from_pretrained):
        with pytest.raises(ModelError, match="not a valid safetensors file") as refused:
            load(damaged)
        assert str(file) in str(refused.value)


@pytest.mark.parametrize("damaged", ["overlapping offsets"], indirect=True)
def test_damaged_safetensors_through_the_command_line_exits_2(damaged, tiny, yes_in_process):
    proc = yes_in_process("fastalign.evaluate", ["--model_name_or_path", damaged, "--data_path", tiny[1]])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"error: {damaged / SAFETENSORS_SINGLE}: not a valid safetensors file" in proc.stderr


def test_rows_read_through_the_library_equal_the_whole_weight(tiny):
    """Sharded loading reads row ranges (get_slice); they tile the weight exactly, in any dtype."""
    reader = CheckpointReader(tiny[0])
    name = "embed_tokens.weight"
    whole = reader.read(name)
    rows = whole.shape[0]
    pieces = [reader.read(name, dtype=torch.bfloat16, rows=slice(a, min(a + 100, rows))) for a in range(0, rows, 100)]
    torch.testing.assert_close(torch.cat(pieces), whole.to(torch.bfloat16), rtol=0, atol=0)
