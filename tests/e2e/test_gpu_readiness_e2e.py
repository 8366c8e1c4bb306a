"""What a first run on a CUDA machine depends on, checked on this CPU-only one: GPU tests collect
without the optional test packages, CPU tests keep to the CPU on any machine, the process group
can reduce host tensors under CPU offload, and gradient accumulation all-reduces once per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- accumulation

COUNT_ALL_REDUCES = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from fastalign import train
    from fastalign.cli import exit_process

    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):  # FSDP2's gradient all-reduce calls dist.all_reduce
        if "_fsdp" in sys._getframe(1).f_code.co_filename:
            calls.append(1)
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    status = train.main(sys.argv[2:])
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}", "w") as out:
        out.write(str(len(calls)))
    exit_process(status)
""")


def test_accumulation_all_reduces_replicated_gradients_once_per_step(tmp_path):
    """--fsdp no_shard (replicas), 2 ranks, 2 steps of 4 micro-batches: one gradient all-reduce
    per FSDP unit (2 layers + root) per step, not per micro-batch, and the same weights as
    full_shard (which reduce-scatters every micro-batch)."""
    from helpers.training import assert_same_weights, common

    from fastalign.data import sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    model = build_tiny_llama(tmp_path / "model", sandbox_texts(sample_data_path()), vocab_size=300,
                             hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, max_position_embeddings=256)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(sample_data_path().read_text().splitlines()[:24]) + "\n")
    script = tmp_path / "count.py"
    script.write_text(COUNT_ALL_REDUCES)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    counts = {}
    for name, fsdp in (("replicated", "no_shard"), ("sharded", "full_shard auto_wrap")):
        args = common(model, data, tmp_path / name, max_steps=2, per_device_train_batch_size=1,
                      gradient_accumulation_steps=4, logging_steps=2, fsdp=fsdp,
                      max_tokens_per_batch=0)  # 4 micro-batches a step, not one packed by the budget
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", str(script), str(tmp_path / name), *args],
                                capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        counts[name] = [int((tmp_path / f"{name}.rank{r}").read_text()) for r in (0, 1)]
    assert counts["replicated"] == [3 * 2, 3 * 2], counts  # (2 layers + root) x 2 steps
    assert counts["sharded"] == [0, 0], counts  # a 1-D mesh reduce-scatters only
    assert_same_weights(tmp_path / "replicated", tmp_path / "sharded", atol=1e-6)


# ----------------------------------------------------------------------------- the suite itself

BARE_IMAGE_MISSING = ("hypothesis", "matplotlib", "tensorboard", "wandb")


def _pytest(args: list[str], env_changes: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "blocked"), str(REPO)]),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **env_changes)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def _block_imports(tmp_path: Path) -> None:
    """Packages that raise ImportError when imported: the GPU image has none of them."""
    for name in BARE_IMAGE_MISSING:
        package = tmp_path / "blocked" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(  # what a missing package raises
            f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n')


def _collected(stdout: str) -> list[str]:
    return sorted(line for line in stdout.splitlines() if "::" in line)


def test_every_gpu_test_is_collected_without_the_optional_test_packages(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "installed").mkdir()
    _block_imports(tmp_path)
    collect = ["--collect-only", "-q", "-m", "gpu", "tests"]
    with ThreadPoolExecutor(2) as pool:  # two independent collections, one per core
        normal, bare = pool.map(lambda root: _pytest(collect, {}, root), (tmp_path / "installed", tmp_path))
    assert normal.returncode == 0, normal.stdout[-3000:]
    assert bare.returncode == 0, bare.stdout[-3000:]  # no collection error anywhere
    assert _collected(normal.stdout) and _collected(bare.stdout) == _collected(normal.stdout)
    # the property tests themselves skip, one by one, instead of breaking their module
    run = _pytest(["-q", "-rs", "tests/unit/test_evaluate.py", "-k", "metrics_match or summary"], {}, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "needs hypothesis" in run.stdout and " passed" in run.stdout


def test_triton_cases_never_use_cpu_tensors_without_the_interpreter(tmp_path):
    # On a CUDA machine conftest leaves TRITON_INTERPRET unset, so a Triton case on CPU tensors
    # fails there ("needs CUDA tensors"). Simulated here: interpreter off, no CUDA -> every
    # Triton case must skip (on CUDA they run compiled on CUDA tensors), none may fail.
    result = _pytest(["-q", "-rs", "tests/unit/test_loss.py", "-k", "triton and not compile"],
                     {"TRITON_INTERPRET": "0"}, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Triton needs CUDA, or TRITON_INTERPRET=1" in result.stdout


@pytest.fixture(scope="module")
def visible_devices_in_a_module_fixture():
    # Module fixtures (a trained run shared by a module's tests) start before per-test fixtures.
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_cpu_tests_start_their_processes_without_gpus(visible_devices_in_a_module_fixture):
    # Training under torchrun with 4 ranks, `mfu is None`, gloo: the CPU tests' assumptions hold
    # on a machine with 0, 1 or 8 GPUs because their processes see none (conftest.py).
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" == visible_devices_in_a_module_fixture
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "0", probe.stderr[-2000:]


# ----------------------------------------------------------------------------- gpu-check orchestration


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _stand_in_stages(python, out_dir, scratch):
    from benchmarks.gpu_check import Stage

    noisy_failure = ("import sys; print('loading'); print('RuntimeError: the first cause'); "
                     "print('error: a consequence', file=sys.stderr); sys.exit(3)")
    return [
        Stage("fine", _script("print('ok')"), max_s=30),
        Stage("broken", _script(noisy_failure), max_s=30),
        Stage("after_broken", _script("print('never')"), max_s=30, needs="broken"),
        Stage("hangs", _script("import time; print('started', flush=True); time.sleep(60)"), max_s=1.5),
        Stage("optional", _script("print('never')"), max_s=30, skip_reason="trl is not importable here"),
        Stage("big_gpu", _script("print('never')"), max_s=30, min_gpu_gib=64),
        Stage("long", _script("import time; print('working', flush=True); time.sleep(60)"), max_s=120),
        Stage("late", _script("print('never')"), max_s=30, min_s=20),
    ]


def _fake_environment(fatal: str = ""):
    from benchmarks.gpu_check import StageResult

    def environment_stage(out_dir):
        info = {"torch": "2.x", "gpu_name": "Stand-in GPU", "gpu_mem_bytes": 40 * 2**30}
        (out_dir / "environment.json").write_text(json.dumps(info))
        return StageResult("environment", "failed" if fatal else "ok", 0.1, note=fatal), info, fatal

    return environment_stage


def test_gpu_check_runs_stages_in_the_budget_and_reports_each_status(tmp_path):
    """ok, failed (first error line), skipped (needs a failed stage / optional package / GPU memory
    / budget), timeout (its own limit) and cut (the budget's limit), in summary.json and exit 1."""
    from benchmarks import gpu_check

    started = time.perf_counter()
    status = gpu_check.check(tmp_path, budget_s=9.0, only=None, environment_stage=_fake_environment(),
                             stage_list=_stand_in_stages)
    elapsed = time.perf_counter() - started
    summary = json.loads((tmp_path / "summary.json").read_text())
    got = {s["name"]: s for s in summary["stages"]}
    assert list(got) == ["environment", "fine", "broken", "after_broken", "hangs", "optional", "big_gpu", "long",
                         "late"]
    assert {name: s["status"] for name, s in got.items()} == {
        "environment": "ok", "fine": "ok", "broken": "failed", "after_broken": "skipped", "hangs": "timeout",
        "optional": "skipped", "big_gpu": "skipped", "long": "cut", "late": "skipped"}
    assert got["broken"]["note"] == "RuntimeError: the first cause" and got["broken"]["returncode"] == 3
    assert got["after_broken"]["note"] == "needs broken, which did not pass"
    assert "its own limit" in got["hangs"]["note"] and "started" in got["hangs"]["note"]
    assert got["optional"]["note"] == "trl is not importable here"
    assert got["big_gpu"]["note"] == "needs 64 GiB of GPU memory, has 40"
    assert "the budget stopped it" in got["long"]["note"] and "working" in got["long"]["note"]
    assert "of the 9 s budget left, it needs about 20 s" in got["late"]["note"]
    assert (tmp_path / "broken.log").read_text().startswith("loading")
    assert status == 1 and elapsed < 30
    row = (tmp_path / "results-row.md").read_text()
    assert "broken failed (RuntimeError: the first cause)" in row and "long cut" in row


def test_gpu_check_passes_when_nothing_failed_even_if_the_budget_cut_a_stage(tmp_path):
    from benchmarks import gpu_check

    def stand_ins(python, out_dir, scratch):
        return [s for s in _stand_in_stages(python, out_dir, scratch) if s.name in ("fine", "optional", "long")]

    status = gpu_check.check(tmp_path, budget_s=7.0, only=None, environment_stage=_fake_environment(),
                             stage_list=stand_ins)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok", "ok", "skipped", "cut"]
    assert status == 0


def test_gpu_check_stops_at_a_fatal_environment_with_every_stage_listed(tmp_path, capsys):
    from benchmarks import gpu_check
    from fastalign.cli import run_main

    cause = "Triton cannot launch a kernel (RuntimeError: Failed to find C compiler); fix: install a C compiler"

    def main(argv):
        return gpu_check.check(tmp_path, budget_s=100.0, only=None, environment_stage=_fake_environment(cause),
                               stage_list=_stand_in_stages)

    assert run_main(main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: gpu-check stopped at the environment stage: {cause}"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fatal"] == cause
    stages = summary["stages"][1:]
    assert [s["name"] for s in stages] == [s.name for s in _stand_in_stages("python", tmp_path, tmp_path)]
    assert all(s["status"] == "skipped" and s["note"] == f"environment: {cause}" for s in stages)
    assert not (tmp_path / "fine.log").exists()  # nothing ran


def test_gpu_check_only_brings_the_stages_a_chosen_one_needs(tmp_path):
    from benchmarks import gpu_check

    status = gpu_check.check(tmp_path, budget_s=60.0, only=["after_broken"], environment_stage=_fake_environment(),
                             stage_list=_stand_in_stages)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [
        ("environment", "ok"), ("broken", "failed"), ("after_broken", "skipped")]
    assert status == 1


def test_gpu_check_reports_backends_and_versions_and_a_results_row(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--only", "--out_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    info = json.loads((tmp_path / "environment.json").read_text())
    import torch

    assert info["attention_backend"] in ("flash_attn", "torch_varlen", "sdpa")
    assert info["loss_backend"] in ("triton", "torch") and info["torch"] == torch.__version__
    assert "triton" in info and "flash_attn" in info and "flash_attn_usable" in info
    for key in ("attention_backend", "loss_backend", "torch", "triton"):
        assert f"{key}: " in result.stdout  # on the console too
    row = (tmp_path / "results-row.md").read_text()
    assert row.startswith("| ") and f"attention {info['attention_backend']}" in row and "triton " in row
