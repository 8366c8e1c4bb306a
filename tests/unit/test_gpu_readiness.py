"""GPU readiness checked on CPU in-process: collectives under offload, the gpu-check's verdicts, the
Triton probe."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from fastalign.distributed import process_group_backend

REPO = Path(__file__).resolve().parents[2]


def test_process_group_backend_adds_gloo_for_host_tensors_under_offload():
    assert process_group_backend(use_cuda=False, cpu_collectives=False) == "gloo"
    assert process_group_backend(use_cuda=False, cpu_collectives=True) == "gloo"
    assert process_group_backend(use_cuda=True, cpu_collectives=False) == "nccl"
    assert process_group_backend(use_cuda=True, cpu_collectives=True) == "cuda:nccl,cpu:gloo"


@pytest.mark.parametrize("fsdp,wanted", [("full_shard auto_wrap offload", True),
                                         ("full_shard auto_wrap", False), ("", False)])
def test_trainer_asks_for_cpu_collectives_exactly_with_offload(monkeypatch, tmp_path, fsdp, wanted):
    from fastalign import train

    asked = []

    class Stop(Exception):
        pass

    def fake_init(*args, cpu_collectives=False, **kwargs):
        asked.append(cpu_collectives)
        raise Stop

    monkeypatch.setattr(train.fdist, "init_distributed", fake_init)
    with pytest.raises(Stop):
        train.main(["--model_name_or_path", str(tmp_path / "model"), "--data_path", str(tmp_path / "d.json"),
                    "--output_dir", str(tmp_path / "out"), "--fsdp", fsdp])
    assert asked == [wanted]


def _junit(tmp_path: Path, cases: list[tuple[str, str | None, str]]) -> Path:
    """A JUnit file as pytest writes it: (test name, None | failure | error | skipped, message)."""
    body = "".join(f'<testcase classname="tests.t" name="{name}">'
                   + (f'<{kind} message="{message}">{message}</{kind}>' if kind else "")
                   + "</testcase>" for name, kind, message in cases)
    path = tmp_path / "pytest.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_gpu_check_fails_when_fewer_gpu_tests_ran_than_were_collected(tmp_path):
    from benchmarks.gpu_check import pytest_verdict, read_junit

    # pytest stopped early (a module failed to import): 18 collected on their own, 0 ran
    status, note = pytest_verdict(read_junit(_junit(tmp_path, []), collected=18), 2, "")
    assert status == "failed" and "only 0 ran" in note
    ok_cases = [(f"test_{i}", None, "") for i in range(17)]
    flash = ("test_backend[flash_attn]", "skipped", "flash_attn not available here")
    status, note = pytest_verdict(read_junit(_junit(tmp_path, ok_cases + [flash]), collected=18), 0, "")
    assert status == "ok" and note.startswith("17 passed, 0 failed, 0 errors, 1 skipped of 18 collected")
    assert "flash_attn not available here" in note  # an optional package: listed, not failed
    no_cuda = ("test_train", "skipped", "needs CUDA (run by `make gpu-check`)")
    status, note = pytest_verdict(read_junit(_junit(tmp_path, ok_cases + [no_cuda]), collected=18), 0, "")
    assert status == "failed" and "skipped for want of CUDA: test_train" in note
    failing = ("test_kernel", "failure", "AssertionError: loss differs by 3e-2")
    status, note = pytest_verdict(read_junit(_junit(tmp_path, ok_cases + [failing]), collected=18), 1, "")
    assert status == "failed" and "first: test_kernel: AssertionError: loss differs by 3e-2" in note
    status, note = pytest_verdict(None, 4, "collecting the GPU tests failed (exit 2): E   ImportError: x")
    assert status == "failed" and note.startswith("collecting the GPU tests failed")


def test_gpu_check_trains_the_bundled_and_the_long_query_data_at_gpu_size():
    # The CPU targets are judged on the bundled records and on long-query realignment-like ones;
    # the GPU run must measure both, with the same data settings, not only the bundled one.
    from benchmarks.gpu_check import stages
    from benchmarks.lib.presets import TRAIN_PRESETS

    presets = [stage.argv[stage.argv.index("--preset") + 1] for stage in stages("python", REPO, REPO)
               if stage.argv[1].endswith("train_throughput.py") and "--build_model_dir" not in stage.argv]
    gpu = [TRAIN_PRESETS[name] for name in presets]
    assert gpu and all(p.device == "cuda" for p in gpu)
    import torch

    from fastalign.config import step_token_budget

    for p in gpu:  # what a user gets: the trainer's CUDA default budget for the published bs 1
        assert p.max_tokens_per_batch == step_token_budget(None, torch.device("cuda"), batch_size=1,
                                                           num_comp=p.num_comp, model_max_length=p.model_max_length)
    assert any(not p.realignment_queries and not p.min_response_chars for p in gpu)  # bundled records
    realign = [p for p in gpu if p.realignment_queries]
    cpu = TRAIN_PRESETS["cpu-tiny-realign"]
    assert realign and all((p.num_comp, p.model_max_length) == (cpu.num_comp, cpu.model_max_length)
                           for p in realign)


def test_gpu_check_reason_is_the_first_error_line_not_a_traceback():
    from benchmarks.gpu_check import failure_reason

    wall = "\n".join(["step 1", "Traceback (most recent call last):",
                      *[f'  File "x.py", line {i}, in f' for i in range(40)],
                      "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "",
                      "error: loss_head: 1 method run(s) failed; first: fastalign ..."])
    assert failure_reason(wall) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failure_reason("error: --preset gpu-9b: unknown preset\n") == "error: --preset gpu-9b: unknown preset"
    assert failure_reason("") == "no output"


def test_the_1b_stages_share_one_checkpoint_built_outside_the_results_folder(tmp_path):
    from benchmarks.gpu_check import stages

    out_dir, scratch = tmp_path / "out", tmp_path / "scratch"
    planned = {stage.name: stage for stage in stages("python", out_dir, scratch)}
    build = planned["checkpoint_1b"].argv
    shared = Path(build[build.index("--build_model_dir") + 1])
    assert shared.parent == scratch  # 2.2 GB: never in the folder that comes back
    users = [s for s in planned.values() if "--model_dir" in s.argv]
    assert {s.name for s in users} >= {"train_gpu-1b", "train_gpu-1b-realign", "peer_trl"}
    for stage in users:
        assert Path(stage.argv[stage.argv.index("--model_dir") + 1]) == shared and stage.needs == "checkpoint_1b"
    names = list(planned)
    assert names.index("checkpoint_1b") < min(names.index(s.name) for s in users)
    assert {"train_compile", "train_offload", "train_checkpointing"} <= set(planned)


def test_environment_verdicts_name_the_cause_and_the_fix():
    from benchmarks.gpu_environment import verdict

    base = {"cuda_available": True, "torch": "2.5.1+cu124", "cuda_build": "12.4", "flash_attn": None,
            "gpu_capability": "9.0", "attention_backend": "torch_varlen", "triton_launch": {"ok": True},
            "c_compiler": {"path": "/usr/bin/cc"}, "python_headers": {"path": "/usr/include/python3.11/Python.h"}}
    assert verdict(base).fatal == "" and verdict(base).problems == []
    no_cuda = verdict({**base, "cuda_available": False, "cuda_build": None})
    assert no_cuda.fatal.startswith("no CUDA device visible to torch 2.5.1+cu124") and "fix:" in no_cuda.fatal
    launcher = verdict({**base, "triton_launch": {"ok": False, "error": "CalledProcessError: gcc exited 1"},
                        "python_headers": {"path": None}})
    assert launcher.fatal.startswith("Triton cannot launch a kernel (CalledProcessError: gcc exited 1)")
    assert "install Python's headers" in launcher.fatal and "python3-dev" in launcher.fatal
    assert "a C compiler" not in launcher.fatal.split("fix:")[1]  # the compiler was found
    slow = verdict({**base, "attention_backend": "sdpa", "attention_reason": "not torch_varlen: no varlen_attn"})
    assert slow.fatal == "" and len(slow.problems) == 1
    assert "per-sequence SDPA on sm90 (torch 2.5.1+cu124, flash-attn none)" in slow.problems[0]
    assert verdict({**base, "attention_backend": "sdpa", "gpu_capability": "7.5"}).problems == []  # no faster one


def test_the_triton_probe_kernel_adds_one_and_its_launch_failure_is_one_line():
    pytest.importorskip("triton")
    import torch
    from helpers.devices import TRITON_DEVICE

    from benchmarks.gpu_environment import triton_launch

    if TRITON_DEVICE is None:
        pytest.skip("Triton needs CUDA, or TRITON_INTERPRET=1")
    from benchmarks.triton_probe import add_one

    assert add_one(torch.zeros(5, device=TRITON_DEVICE)).tolist() == [1.0] * 5  # what the GPU check launches
    if not torch.cuda.is_available():  # the launch itself needs CUDA: a failure it reports, never raises
        launch = triton_launch()
        assert launch["ok"] is False and "\n" not in launch["error"] and launch["error"]


def test_environment_finds_the_compiler_and_headers_triton_builds_with(monkeypatch, tmp_path):
    from benchmarks.gpu_environment import c_compiler, python_headers

    headers = python_headers()
    if headers["path"]:  # this machine builds Triton launchers: the version is Python's own
        assert Path(headers["path"]).name == "Python.h" and headers["version"] == platform.python_version()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert c_compiler() == {"path": None, "version": None, "looked_for": [str(tmp_path / "no-such-cc")]}
    monkeypatch.delenv("CC")
    found = c_compiler()
    assert found["path"] is None or (Path(found["path"]).is_file() and found["version"])
