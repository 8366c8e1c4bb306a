"""What a first run on a CUDA machine depends on, checked on this CPU-only one: GPU tests collect
without the optional test packages, CPU tests keep to the CPU on any machine, the process group
can reduce host tensors under CPU offload, and gradient accumulation all-reduces once per step.

Most of these tests check a process: a pytest run, a gpu-check over stand-in stages that wait for
their time limits. They are all started together when the module starts (`background`) and each
test waits for its own: their imports share the cores and the stand-ins' waits overlap the other
tests' work, instead of queueing one after the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.bench_runs import run_bench
from helpers.gpu_check_stand_ins import fake_environment, stand_in_stages  # and the source tree on sys.path

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]
BARE_IMAGE_MISSING = ("hypothesis", "matplotlib", "tensorboard", "wandb")
# the gpu-check budgets of the two background runs over the stand-in stages: "hangs" (1.5 s) and
# what comes before it must leave "long" its 5 s minimum to start; the rest of the budget cuts it
BUDGET_S = {"failing": 12.0, "passing": 10.0}


class Started:
    """A process started with the module; `result()` waits for it (killed after `timeout` s)."""

    def __init__(self, argv: list[str], env: dict[str, str], logs: Path, timeout: float = 300):
        self.logs, self.timeout = logs, timeout
        logs.mkdir(parents=True)
        with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                         cwd=REPO, env=env)

    def result(self) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.proc.args} still running after {self.timeout} s: "
                                 f"{(self.logs / 'err').read_text()[-3000:]}") from None
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, (self.logs / "out").read_text(),
                                           (self.logs / "err").read_text())


def _block_imports(root: Path) -> Path:
    """A folder of packages that raise ImportError when imported: the GPU image has none of them."""
    for name in BARE_IMAGE_MISSING:
        package = root / "blocked" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(  # what a missing package raises
            f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n')
    return root / "blocked"


def _background_processes(root: Path) -> dict[str, tuple[str, list[str], dict[str, str]]]:
    """name -> (the test that checks it, argv, environment changes)."""
    blocked = str(_block_imports(root))
    pytest_ = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    plain = {"PYTHONPATH": str(REPO), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    bare = dict(plain, PYTHONPATH=os.pathsep.join([blocked, str(REPO)]))
    collect = ["--collect-only", "-q", "-m", "gpu", "tests"]
    collection = "test_every_gpu_test_is_collected_without_the_optional_test_packages"
    stand_ins = [sys.executable, "-m", "helpers.gpu_check_stand_ins"]
    stand_ins_env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    passing = ["fine", "optional", "long"]
    return {
        "collect_installed": (collection, pytest_ + collect, plain),
        "collect_bare": (collection, pytest_ + collect, bare),
        # the property tests themselves skip, one by one, instead of breaking their module
        "evaluate_bare": (collection, pytest_ + ["-q", "-rs", "tests/unit/test_evaluate.py", "-k",
                                                 "metrics_match or summary"], bare),
        "triton_off": ("test_triton_cases_never_use_cpu_tensors_without_the_interpreter",
                       pytest_ + ["-q", "-rs", "tests/unit/test_loss.py", "-k", "triton and not compile"],
                       dict(plain, TRITON_INTERPRET="0")),
        "failing": ("test_gpu_check_runs_stages_in_the_budget_and_reports_each_status",
                    stand_ins + [str(root / "failing.json"), str(root / "failing-out"), str(BUDGET_S["failing"])],
                    stand_ins_env),
        "passing": ("test_gpu_check_passes_when_nothing_failed_even_if_the_budget_cut_a_stage",
                    stand_ins + [str(root / "passing.json"), str(root / "passing-out"), str(BUDGET_S["passing"]),
                                 *passing], stand_ins_env),
    }


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory, _cpu_only_subprocesses):
    """(the module's scratch folder, name -> Started) for the processes of the tests selected in
    this session, started as the module starts (after CUDA_VISIBLE_DEVICES is cleared for it)."""
    root = tmp_path_factory.mktemp("gpu-readiness")
    selected = {item.name for item in request.session.items if getattr(item, "module", None) is request.module}
    started = {}
    for name, (test, argv, env_changes) in _background_processes(root).items():
        assert callable(globals().get(test)), test  # a renamed test must rename its process's entry
        if test in selected:
            started[name] = Started(argv, dict(os.environ, **env_changes), root / "logs" / name)
    yield root, started
    for process in started.values():
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


# ----------------------------------------------------------------------------- the suite itself


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


def _collected(stdout: str) -> list[str]:
    return sorted(line for line in stdout.splitlines() if "::" in line)


def test_every_gpu_test_is_collected_without_the_optional_test_packages(background):
    _, started = background
    normal, bare = started["collect_installed"].result(), started["collect_bare"].result()
    assert normal.returncode == 0, normal.stdout[-3000:]
    assert bare.returncode == 0, bare.stdout[-3000:]  # no collection error anywhere
    assert _collected(normal.stdout) and _collected(bare.stdout) == _collected(normal.stdout)
    # the property tests themselves skip, one by one, instead of breaking their module
    run = started["evaluate_bare"].result()
    assert run.returncode == 0, run.stdout[-3000:]
    assert "needs hypothesis" in run.stdout and " passed" in run.stdout


def test_triton_cases_never_use_cpu_tensors_without_the_interpreter(background):
    # On a CUDA machine conftest leaves TRITON_INTERPRET unset, so a Triton case on CPU tensors
    # fails there ("needs CUDA tensors"). Simulated here: interpreter off, no CUDA -> every
    # Triton case must skip (on CUDA they run compiled on CUDA tensors), none may fail.
    result = background[1]["triton_off"].result()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Triton needs CUDA, or TRITON_INTERPRET=1" in result.stdout


# ----------------------------------------------------------------------------- gpu-check orchestration


def test_gpu_check_reports_backends_and_versions_and_a_results_row(tmp_path):
    result = run_bench("gpu_check", "--only", "--out_dir", tmp_path, timeout=120)
    info = json.loads((tmp_path / "environment.json").read_text())
    assert info["attention_backend"] in ("flash_attn", "torch_varlen", "sdpa")
    assert info["loss_backend"] in ("triton", "torch") and info["torch"] == torch.__version__
    assert "triton" in info and "flash_attn" in info and "flash_attn_usable" in info
    for key in ("attention_backend", "loss_backend", "torch", "triton"):
        assert f"{key}: " in result.stdout  # on the console too
    row = (tmp_path / "results-row.md").read_text()
    assert row.startswith("| ") and f"attention {info['attention_backend']}" in row and "triton " in row


def test_gpu_check_stops_at_a_fatal_environment_with_every_stage_listed(tmp_path, capsys):
    from benchmarks import gpu_check
    from fastalign.cli import run_main

    cause = "Triton cannot launch a kernel (RuntimeError: Failed to find C compiler); fix: install a C compiler"

    def main(argv):
        return gpu_check.check(tmp_path, budget_s=100.0, only=None, environment_stage=fake_environment(cause),
                               stage_list=stand_in_stages)

    assert run_main(main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: gpu-check stopped at the environment stage: {cause}"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fatal"] == cause
    stages = summary["stages"][1:]
    assert [s["name"] for s in stages] == [s.name for s in stand_in_stages("python", tmp_path, tmp_path)]
    assert all(s["status"] == "skipped" and s["note"] == f"environment: {cause}" for s in stages)
    assert not (tmp_path / "fine.log").exists()  # nothing ran


def test_gpu_check_only_brings_the_stages_a_chosen_one_needs(tmp_path):
    from benchmarks import gpu_check

    status = gpu_check.check(tmp_path, budget_s=60.0, only=["after_broken"], environment_stage=fake_environment(),
                             stage_list=stand_in_stages)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [
        ("environment", "ok"), ("broken", "failed"), ("after_broken", "skipped")]
    assert status == 1


def _stand_in_run(background, name: str) -> tuple[int, float, Path]:
    """(the check's exit status, its seconds, its out_dir) of a background run over the stand-ins."""
    root, started = background
    result = started[name].result()
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads((root / f"{name}.json").read_text())
    return outcome["status"], outcome["elapsed"], root / f"{name}-out"


def test_gpu_check_runs_stages_in_the_budget_and_reports_each_status(background):
    """ok, failed (first error line), skipped (needs a failed stage / optional package / GPU memory
    / budget), timeout (its own limit) and cut (the budget's limit), in summary.json and exit 1."""
    status, elapsed, out_dir = _stand_in_run(background, "failing")
    summary = json.loads((out_dir / "summary.json").read_text())
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
    assert f"of the {BUDGET_S['failing']:.0f} s budget left, it needs about 20 s" in got["late"]["note"]
    assert (out_dir / "broken.log").read_text().startswith("loading")
    assert status == 1 and elapsed < 30
    row = (out_dir / "results-row.md").read_text()
    assert "broken failed (RuntimeError: the first cause)" in row and "long cut" in row


def test_gpu_check_passes_when_nothing_failed_even_if_the_budget_cut_a_stage(background):
    status, _, out_dir = _stand_in_run(background, "passing")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok", "ok", "skipped", "cut"]
    assert status == 0


# ----------------------------------------------------------------------------- accumulation
# Last in the module: its two ranks meet at every collective, which is slow while the background
# processes still fill the cores.


def count_all_reduces(prefix: Path, args: list[str]) -> subprocess.CompletedProcess:
    """fastalign.train on 2 ranks with FSDP2's gradient all-reduces counted per rank
    (helpers/all_reduce_counter.py)."""
    from helpers import all_reduce_counter
    from helpers.ranks import run_ranks

    return run_ranks(all_reduce_counter.main, [prefix, *args], nproc=2)


def test_accumulation_all_reduces_replicated_gradients_once_per_step(tmp_path):
    """--fsdp no_shard (replicas), 2 ranks, 2 steps of 4 micro-batches: one gradient all-reduce
    per FSDP unit (2 layers + root) per step, not per micro-batch, and the same weights as
    full_shard (which reduce-scatters every micro-batch)."""
    from helpers.training import assert_same_weights, common

    from fastalign.data import sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    # its own model, smaller than the session's `tiny`: replicated and sharded weights come out
    # ~6e-8 apart here, ~8e-7 with `tiny`, too close to the 1e-6 tolerance
    model = build_tiny_llama(tmp_path / "model", sandbox_texts(sample_data_path()), vocab_size=300,
                             hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, max_position_embeddings=256)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(sample_data_path().read_text().splitlines()[:24]) + "\n")
    counts = {}
    for name, fsdp in (("replicated", "no_shard"), ("sharded", "full_shard auto_wrap")):
        args = common(model, data, tmp_path / name, max_steps=2, per_device_train_batch_size=1,
                      gradient_accumulation_steps=4, logging_steps=2, fsdp=fsdp,
                      max_tokens_per_batch=0)  # 4 micro-batches a step, not one packed by the budget
        result = count_all_reduces(tmp_path / name, args)
        assert result.returncode == 0, result.stderr[-4000:]
        counts[name] = [int((tmp_path / f"{name}.rank{r}").read_text()) for r in (0, 1)]
    assert counts["replicated"] == [3 * 2, 3 * 2], counts  # (2 layers + root) x 2 steps
    assert counts["sharded"] == [0, 0], counts  # a 1-D mesh reduce-scatters only
    assert_same_weights(tmp_path / "replicated", tmp_path / "sharded", atol=1e-6)
