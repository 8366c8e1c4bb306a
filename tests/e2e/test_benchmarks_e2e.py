"""The benchmark scripts run on their smoke presets and write valid JSON; no timing is asserted.

Also checked, because a benchmark is only worth its fairness: both sides of a comparison compute
the same loss on the same groups, every loss-head method the same loss, every training mode the
eager run's losses.

Each script's `main` runs in a process forked from this one (helpers/bench_runs.py; peer_trl's in
a new interpreter); the processes a script starts itself (workers, ranks, probes, training runs)
are what it measures and stay real. The longer runs start together when the module does, two at a
time (`runs`), each test waiting for its own; `test_every_script_starts_as_a_command` starts each
script as a user does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from helpers.bench_results import finite, only_json  # noqa: E402
from helpers.bench_runs import RunPool, run_bench, run_script  # noqa: E402

# The longer runs, started when the module starts, two at a time, in this order (the longest chains of
# one process after another first): script and arguments, "{out}" the run's own folder. A run is
# made when a selected test asks for its fixture, `<key>_run`; the tests before those run meanwhile.
RUNS = {
    "startup": ("startup", "--repeats", "1", "--records", "40", "--out_dir", "{out}"),
    "train_throughput": ("train_throughput", "--preset", "cpu-smoke", "--warmup", "0", "--steps", "1",
                         "--out_dir", "{out}", "--plot"),
    "scaling": ("scaling", "--preset", "cpu-smoke", "--warmup", "0", "--steps", "1", "--out_dir", "{out}"),
    "train_modes": ("train_modes", "--mode", "checkpointing", "--preset", "cpu-smoke", "--steps", "2",
                    "--work_dir", "{out}/work", "--out_dir", "{out}"),
    "load_memory": ("load_memory", "--preset", "smoke", "--layers", "1", "--layouts", "safetensors", "--out_dir",
                    "{out}"),
    "loss_head": ("loss_head", "--preset", "cpu-small", "--tokens", "256", "--hidden", "64", "--vocab", "1000",
                  "--repeats", "1", "--out_dir", "{out}"),
}


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    """key -> (the run's CompletedProcess, its folder), for the RUNS the selected tests ask for."""
    wanted = {name for item in request.session.items if item.module is request.module for name in item.fixturenames}
    pool, folders = RunPool(slots=2), {}
    for key, (script, *argv) in RUNS.items():
        if f"{key}_run" in wanted:
            folders[key] = tmp_path_factory.mktemp(key)
            pool.add(key, script, *(arg.format(out=folders[key]) for arg in argv), timeout=600)
    pool.start()
    yield lambda key: (pool.result(key), folders[key])
    pool.close()


@pytest.fixture
def startup_run(runs):
    return runs("startup")


@pytest.fixture
def train_throughput_run(runs):
    return runs("train_throughput")


@pytest.fixture
def scaling_run(runs):
    return runs("scaling")


@pytest.fixture
def train_modes_run(runs):
    return runs("train_modes")


@pytest.fixture
def load_memory_run(runs):
    return runs("load_memory")


@pytest.fixture
def loss_head_run(runs):
    return runs("loss_head")


# ----------------------------------------------------------------------------- the scripts as commands


# Every script users run, as they run it (`python benchmarks/NAME.py`, from any folder, no PYTHONPATH):
# the tests below fork the scripts' `main`s, this one starts the interpreter on each file.
SCRIPTS = ("baseline_original", "checkpoint_save", "data_pipeline", "gpu_check", "load_memory", "loss_head",
           "peer_trl", "scaling", "startup", "train_modes", "train_throughput")


def test_every_script_starts_as_a_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"], cwd=tmp_path,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in SCRIPTS}  # side by side: a second each, most of it torch's import
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, err[-3000:])
        assert out.startswith("usage: ") and f"{name}.py" in out.splitlines()[0], (name, out[:300])


# ----------------------------------------------------------------------------- forked from this process


def test_baseline_original_runs_on_the_smoke_preset(tmp_path):
    proc = run_bench("baseline_original", "--preset", "cpu-smoke", "--warmup", "0", "--steps", "1",
                     "--out_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = only_json(tmp_path, "baseline_original")
    assert result["preset"] == "cpu-smoke" and result["machine"]["device"] == "cpu"
    assert 0 < result["real_tokens"] <= result["padded_tokens"]
    assert result["peak_memory_bytes"] > 0


def test_data_pipeline_runs_on_a_few_records(tmp_path):
    proc = run_bench("data_pipeline", "--records", "40", "--out_dir", tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = only_json(tmp_path, "data_pipeline")
    assert result["benchmark"] == "data_pipeline" and result["records"] == 40
    stats = result["tokenization_stats"]
    assert stats["records"] == 40 and stats["groups"] > 0 and stats["tokens"] > 0
    stages = {s["stage"]: s for s in result["stages"]}
    assert set(stages) == {"load .jsonl", "load .jsonl.gz", "tokenize", "pack epoch: 1 group/micro, accum 8",
                           "pack epoch: 8192 tokens/micro"}
    for name, stage in stages.items():
        assert finite(stage["wall_seconds"]) and finite(stage["cpu_seconds"]), name
        assert finite(stage["count"], positive=True) and finite(stage["rss_after_bytes"], positive=True), name
    assert stages["load .jsonl"]["count"] == stages["load .jsonl.gz"]["count"] == 40
    assert finite(result["load_tokenize_pack_seconds"]["wall"]) and finite(result["load_tokenize_pack_seconds"]["cpu"])
    one_group = result["layouts"]["pack epoch: 1 group/micro, accum 8"]
    assert one_group["micro_batches"] == stats["groups"]  # one process: no filler micro-batches
    budget = result["layouts"]["pack epoch: 8192 tokens/micro"]
    assert 0 < budget["micro_batches"] < one_group["micro_batches"] and budget["tokens"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA verdict")
def test_gpu_check_without_cuda_stops_in_seconds_with_every_stage_listed(tmp_path):
    from benchmarks.gpu_check import stages

    started = time.perf_counter()
    proc = run_bench("gpu_check", "--out_dir", tmp_path / "out", timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 60  # the facts only; no stage ran
    (verdict,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "no CUDA device visible to torch" in verdict and "fix:" in verdict
    out = proc.stdout.strip().splitlines()
    assert out[0] == out[-1] == f"gpu-check: results in {tmp_path / 'out'}"  # the folder to bring back, first and last
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    listed = [(s["name"], s["status"]) for s in summary["stages"]]
    assert listed == [("environment", "failed")] + [(s.name, "skipped") for s in stages("python", tmp_path, tmp_path)]
    assert all(s["note"].startswith("environment: no CUDA device") for s in summary["stages"][1:])
    env = json.loads((tmp_path / "out" / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["fatal"] == summary["fatal"]
    assert {"path", "version"} <= set(env["c_compiler"]) and {"path", "version"} <= set(env["python_headers"])
    assert env["attention_backend"] == "sdpa" and env["attention_reason"] and env["loss_reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["environment.json", "results-row.md",
                                                                   "summary.json"]


def test_train_modes_judges_the_losses_and_refuses_offload_without_cuda(tmp_path):
    from benchmarks import train_modes

    eager = {"steps": [{"loss": 2.0}, {"loss": 1.9}]}
    close = {"steps": [{"loss": 2.0}, {"loss": 1.9 + 1e-5}]}
    far = {"steps": [{"loss": 2.0}, {"loss": 1.95}]}
    assert train_modes.compare(eager, close, rtol=1e-4)["agree"]
    verdict = train_modes.compare(eager, far, rtol=2e-2)
    assert not verdict["agree"] and verdict["worst_step"] == 2 and verdict["why"].startswith("step 2: loss 1.950000")
    assert not train_modes.compare(eager, {"steps": eager["steps"][:1]}, rtol=1)["agree"]  # a step missing
    if not torch.cuda.is_available():
        proc = run_bench("train_modes", "--mode", "offload", "--work_dir", tmp_path, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
            "error: --mode offload: needs CUDA")


def test_peer_trl_measures_both_sides_on_the_same_pairs(tmp_path):
    pytest.importorskip("trl", reason="TRL is optional: pip install -e '.[peers]'")
    proc = run_script("benchmarks/peer_trl.py", "--preset", "cpu-smoke", "--gradient_accumulation_steps", "2",
                      "--warmup", "1", "--steps", "1", "--repeats", "1", "--max_length", "128",
                      "--out_dir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = only_json(tmp_path, "peer_trl")
    assert result["precision"] == "fp32" and result["batch"]["pairs_per_step"] == 2
    assert set(result["sides"]) == {"trl", "fastalign"} and result["skipped"] == {"liger": "needs CUDA"}
    assert len(result["tokens_per_step"]) >= 2 and all(n > 0 for n in result["tokens_per_step"])
    for side in result["sides"].values():
        assert finite(side["tokens_per_s"], positive=True) and finite(side["peak_memory_bytes"], positive=True)
        assert [len(times) for times in side["step_times_s"]] == [2]  # warm-up + timed
    ratio = result["ratios_vs_trl"]["fastalign"]
    assert ratio["tokens_per_s"] == pytest.approx(result["sides"]["fastalign"]["tokens_per_s"]
                                                  / result["sides"]["trl"]["tokens_per_s"])
    assert result["versions"]["trl"] and result["schedule"]["order"] == ["trl", "fastalign"]


# ----------------------------------------------------------------------------- the runs started with the module


def test_startup_times_every_phase_and_the_warm_cache_skips_the_tokenizer(startup_run):
    proc, tmp_path = startup_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = only_json(tmp_path, "startup")
    assert set(result["summary"]) == {"fastalign, cold cache", "fastalign, warm cache", "original (HF style)"}
    for side, phases in result["summary"].items():
        assert set(phases) == {"imports", "process group", "tokenizer", "data", "model build", "other setup",
                               "first step", "to first step"}, side
        assert all(finite(p["median_s"]) for p in phases.values()), side
        run = result["runs"][side][0]
        assert sum(run["phases"].values()) <= run["to_first_step"] + 1e-6, side  # phases do not overlap
        if side.startswith("fastalign"):  # the tree asked for was measured (this one)
            assert Path(run["source"]).resolve().is_relative_to(ROOT), run["source"]
    assert result["summary"]["fastalign, cold cache"]["tokenizer"]["median_s"] > 0
    assert result["summary"]["fastalign, warm cache"]["tokenizer"]["median_s"] == 0  # never loaded on a hit


def test_train_throughput_runs_on_the_smoke_preset_and_both_sides_agree(train_throughput_run):
    proc, tmp_path = train_throughput_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = only_json(tmp_path, "train_throughput")
    assert set(result["sides"]) == {"baseline", "fastalign", "fastalign_unshared"}
    for side in result["sides"].values():
        assert side["tokens_per_s"] > 0 and side["peak_memory_bytes"] > 0 and len(side["step_times_s"]) == 1
        assert side["mfu"] is None  # CPU: no MFU
    for ratios in (result["ratios"], result["ratios_unshared"]):
        assert {"tokens_per_s", "tokens_per_s_paired_median", "step_time", "peak_memory"} <= set(ratios)
    shared, unshared = (result["sides"][s]["layout_first_measured_step"] for s in ("fastalign", "fastalign_unshared"))
    assert shared["computed_tokens"] < unshared["computed_tokens"]  # each query once
    # the sides optimise the same objective on the same tokens (fp32 on CPU)
    assert result["objective_check"]["abs_diff"] < 1e-4 * max(1.0, abs(result["objective_check"]["baseline"]))
    assert (tmp_path / next(tmp_path.glob("train_throughput-*.json")).with_suffix(".png").name).is_file()


def test_scaling_runs_one_and_two_processes_on_the_smoke_preset(scaling_run):
    proc, tmp_path = scaling_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = only_json(tmp_path, "scaling")
    one, two = result["worlds"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # FSDP shards parameters and optimizer state: per rank they halve (up to uneven shards)
    assert two["vs_1_process"]["param_shard_bytes"] == pytest.approx(0.5, abs=0.05)
    assert two["vs_1_process"]["optimizer_state_bytes"] == pytest.approx(0.5, abs=0.05)
    assert result["estimate_8xA100"]["arithmetic"]


def test_train_modes_compares_a_mode_with_the_eager_run_step_by_step(train_modes_run):
    proc, tmp_path = train_modes_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = only_json(tmp_path, "train_modes")
    assert result["mode"] == "checkpointing" and result["precision"] == "fp32"
    eager, mode = result["runs"]["eager"], result["runs"]["checkpointing"]
    assert mode["flags"] == ["--gradient_checkpointing", "True"] and eager["flags"] == []
    assert [s["step"] for s in eager["steps"]] == [s["step"] for s in mode["steps"]] == [1, 2]
    assert result["comparison"]["agree"] and result["comparison"]["max_rel_diff"] <= 1e-4
    assert all(finite(n, positive=True) for n in result["tokens_per_step"])
    assert (tmp_path / "work" / "eager.json").is_file()  # kept for the next mode's stage


def test_load_memory_runs_the_smoke_model_with_each_loader_in_a_fresh_process(load_memory_run):
    # the other layouts' checkpoints and loads: tests/unit/test_benchmarks.py
    proc, tmp_path = load_memory_run
    result = only_json(tmp_path, "load_memory")
    # exit status 1 means "target missed"; a toy model misses it (imports' allocations dwarf its weights)
    assert proc.returncode == (0 if result["target_met"] else 1), proc.stderr[-3000:]
    assert result["benchmark"] == "load_memory" and result["preset"] == "smoke-1layers-safetensors"
    assert {(r["layout"], r["dtype"], r["loader"]) for r in result["results"]} == {
        ("safetensors", "bfloat16", "fastalign"), ("safetensors", "bfloat16", "transformers")}
    assert finite(result["checkpoint_bytes"], positive=True)
    for r in result["results"]:
        assert r["model_bytes"] == result["checkpoint_bytes"]  # bf16 checkpoint loaded as bf16, every loader
        assert finite(r["seconds"], positive=True)
        assert finite(r["peak_bytes"], positive=True) and r["peak_after_use_bytes"] >= r["peak_bytes"]
        assert r["ratio"] == pytest.approx(r["peak_bytes"] / r["model_bytes"])
        assert finite(r["ratio_after_use"], positive=True)


def test_loss_head_runs_tiny_and_every_method_computes_the_same_loss(loss_head_run):
    proc, tmp_path = loss_head_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = only_json(tmp_path, "loss_head")
    assert result["benchmark"] == "loss_head" and result["machine"]["device"] == "cpu"
    (case,) = result["cases"]
    assert (case["case"]["tokens"], case["case"]["hidden"], case["case"]["vocab"]) == (256, 64, 1000)
    rows = {row["method"]: row for row in case["results"]}
    assert set(rows) == {"fastalign", "full_logits", "chunked_torch", "torch_linear_ce"}  # cpu-small's methods
    measured = {name: row for name, row in rows.items() if "skipped" not in row}
    assert {"fastalign", "full_logits", "chunked_torch"} <= set(measured), rows  # plain torch: always here
    for name, row in measured.items():
        assert finite(row["time"]["median_s"], positive=True) and row["time"]["n"] == 1, name
        assert finite(row["process_cpu_time"]["median_s"]), name
        assert finite(row["peak_extra_bytes"], positive=True), name  # the gradients alone are > 0
        assert row["num_target_tokens"] == measured["full_logits"]["num_target_tokens"] > 0
        assert row["loss"] == pytest.approx(measured["full_logits"]["loss"], rel=1e-4), name
    for row in rows.values():
        assert "time" in row or row["skipped"]  # a skipped method says why
