"""The benchmarks' own code in-process: peak tables, result paths, batches and losses they compare."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from helpers.bench_results import finite, only_json  # noqa: E402

from benchmarks.lib import machine  # noqa: E402
from benchmarks.lib.memory import PeakMemory  # noqa: E402
from benchmarks.lib.results import results_path, utc_date  # noqa: E402
from benchmarks.lib.workers import Worker  # noqa: E402


def test_peak_flops_table_picks_the_specific_name_first():
    assert machine.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert machine.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert machine.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert machine.peak_bf16_tflops("Some Future GPU") is None


def test_peak_memory_sees_an_allocation_made_after_reset():
    memory = PeakMemory("cpu").reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    block += 1
    assert memory.peak_bytes() >= 48 * 2**20


def test_results_path_names_benchmark_date_device_preset(tmp_path):
    path = results_path("train_throughput", "cpu-tiny", "cpu", tmp_path)
    assert path.parent == tmp_path
    assert path.name == f"train_throughput-{utc_date()}-cpu-{machine._cpu_count()}c-cpu-tiny.json"


def test_load_memory_writes_and_loads_every_layout(tmp_path):
    """Each checkpoint layout the script writes loads all of its bytes in the target dtype, measured
    as a worker measures a load (here in this process; tests/e2e runs the script, whose fresh
    processes load the single-file layout with each loader)."""
    from benchmarks import load_memory

    dirs, checkpoint_bytes = load_memory.build_checkpoints(tmp_path, 1, load_memory.PRESETS["smoke"])
    assert set(dirs) == {"safetensors", "sharded", "bin"} and finite(checkpoint_bytes, positive=True)
    assert len(list(dirs["sharded"].glob("model-*-of-*.safetensors"))) > 1
    assert [p.name for p in dirs["bin"].glob("*.safetensors")] == []
    for layout in ("sharded", "bin"):
        r = load_memory.load("fastalign", str(dirs[layout]), "bfloat16")
        assert r["model_bytes"] == checkpoint_bytes, layout  # bf16 checkpoint loaded as bf16
        assert finite(r["seconds"], positive=True), layout
        assert finite(r["peak_bytes"], positive=True) and r["peak_after_use_bytes"] >= r["peak_bytes"], layout
    only, _ = load_memory.build_checkpoints(tmp_path / "one", 1, load_memory.PRESETS["smoke"], ["sharded"])
    assert list(only) == ["sharded"] and sorted(p.name for p in (tmp_path / "one").iterdir()) == ["sharded"]
    with pytest.raises(SystemExit):  # argparse's usage error
        load_memory.main(["--layouts", "safetensors,zip"])


@pytest.fixture(scope="module")
def tokenized_groups():
    from transformers import AutoTokenizer

    from fastalign.data import load_records, sample_data_path, tokenize_records
    from fastalign.tiny import build_tokenizer, sandbox_texts

    records = load_records(sample_data_path()).records[:12]
    tokenizer_dir = build_tokenizer(sandbox_texts(sample_data_path()), 512, ROOT / ".pytest_cache" / "bench-tok")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenize_records(records, tokenizer, model_max_length=96).groups


def test_baseline_batch_holds_fastalign_tokens_and_targets(tokenized_groups):
    from benchmarks.baseline_original import IGNORE_INDEX, pad_group
    from fastalign.data import pack_groups

    for group in tokenized_groups:
        packed = pack_groups([group])
        padded = pad_group(packed)
        bounds = packed.cu_seqlens.tolist()
        for row, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            n = end - start
            assert padded.attention_mask[row].sum() == n
            assert torch.equal(padded.input_ids[row, :n], packed.input_ids[start:end])
            # the original's shifted labels are exactly fastalign's targets
            assert torch.equal(padded.labels[row, 1:n], packed.targets[start:end - 1])
            assert (padded.labels[row, n:] == IGNORE_INDEX).all()
            assert (padded.labels[row, :len(group.query_ids)] == IGNORE_INDEX).all()


def test_unpack_group_round_trips_a_packed_group(tokenized_groups):
    from benchmarks.train_throughput import unpack_group
    from fastalign.data import pack_groups

    for group in tokenized_groups:
        back = unpack_group(pack_groups([group]))
        assert (back.record_index, back.query_ids, back.response_ids) == (group.record_index, group.query_ids,
                                                                          group.response_ids)
        assert back.scores == pytest.approx(group.scores)


def test_original_loss_matches_fastalign_loss_on_the_same_logits():
    """The baseline's loss (seed margins, mean penalty) equals fastalign's objective in seed mode."""
    from benchmarks.baseline_original import AlignmentArgs, original_alignment_loss
    from fastalign.loss import stable_alignment_loss

    torch.manual_seed(0)
    k, length, hidden_size, vocab = 3, 9, 16, 50
    hidden = torch.randn(k, length, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64)
    ids = torch.randint(0, vocab, (k, length))
    lengths = [9, 6, 7]
    query = 3
    labels = torch.full((k, length), -100)
    for r, n in enumerate(lengths):
        labels[r, query:n] = ids[r, query:n]
    scores = torch.tensor([[3.0, 7.0, 5.0]])
    logits = hidden @ weight.T
    for max_flow in (False, True):
        args = AlignmentArgs(margin=2.0, ratio=0.5, max_flow=max_flow, margin_mode="seed")
        ours = original_alignment_loss(logits[:, :-1].contiguous(), labels[:, 1:].contiguous(), scores, args)
        # the same groups, packed: position t of sequence r predicts labels[r, t + 1]
        rows = [torch.arange(n) for n in lengths]
        packed_hidden = torch.cat([hidden[r, :n] for r, n in enumerate(lengths)]).float()
        targets = torch.cat([torch.cat([labels[r, 1:n], torch.tensor([-100])]) for r, n in enumerate(lengths)])
        response_index = torch.cat([torch.full((len(x),), r) for r, x in enumerate(rows)])
        out = stable_alignment_loss(packed_hidden, weight.float(), targets, response_index, scores.view(-1),
                                    torch.zeros(k, dtype=torch.long), rating_scale=7.0, margin=2.0, ratio=0.5,
                                    max_flow=max_flow, margin_mode="seed", backend="torch")
        assert float(out.loss) == pytest.approx(float(ours), rel=1e-4, abs=1e-5)


FAILING_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
from benchmarks.lib.workers import serve


class OutOfMemoryError(RuntimeError):
    pass


def ready(device):
    return {"ok": True}


def broken_setup(**kwargs):
    raise OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")


sys.exit(serve({"ready": ready, "setup": broken_setup}))
"""


def test_loss_head_fails_when_a_method_that_could_run_fails(tmp_path, monkeypatch, capsys):
    # An available method that breaks is a failed benchmark (an `error:` line, exit status 2),
    # not a skipped row in a run that exits 0; the others are still measured and written.
    from benchmarks import loss_head
    from fastalign.cli import run_main

    script = tmp_path / "failing_worker.py"
    script.write_text(FAILING_WORKER)
    real_start = loss_head.start_workers

    def start_workers(plan, device):  # fastalign's worker is one whose setup fails; the others are real
        rest = [i for i, (_, method) in enumerate(plan) if method != "fastalign"]
        workers = {(rest[i], method): worker for (i, method), worker in real_start([plan[i] for i in rest],
                                                                                   device).items()}
        failing = Worker([str(script), str(ROOT)]).start()
        failing.call("ready", device=device)
        workers[next((i, method) for i, (_, method) in enumerate(plan) if method == "fastalign")] = failing
        return workers

    monkeypatch.setattr(loss_head, "start_workers", start_workers)
    status = run_main(loss_head.main, ["--preset", "cpu-small", "--tokens", "128", "--hidden", "32", "--vocab", "300",
                                       "--repeats", "1", "--methods", "fastalign,full_logits",
                                       "--out_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1] == ("error: loss_head: 1 method run(s) failed; first: fastalign (T=128 V=300) setup: "
                       "OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB")
    rows = {row["method"]: row for row in only_json(tmp_path, "loss_head")["cases"][0]["results"]}
    assert rows["fastalign"] == {"method": "fastalign",
                                 "failed": "setup: OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB"}
    assert finite(rows["full_logits"]["time"]["median_s"], positive=True)


def test_peer_pairs_are_each_records_best_and_worst_in_file_order(tmp_path):
    from benchmarks.peer_trl import best_worst_pairs, write_pairs

    src = tmp_path / "records.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"query": "q1", "responses": ["a", "b", "c"], "scores": [3, 7, 1]},
        {"query": "q2", "responses": ["d", "e"], "scores": [4, 4]},  # no preference: left out
        {"query": "q3", "responses": ["f", "g"], "scores": [2, 6]}]) + "\n")
    pairs = best_worst_pairs(src, 3)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("q1", "b", "c"), ("q3", "g", "f"),
                                                                          ("q1", "b", "c")]  # cycled
    lines = [json.loads(line) for line in write_pairs(pairs, tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert lines[0] == {"query": "q1", "responses": ["b", "c"], "scores": [7, 1]}  # --num_comp 2 takes both


def _stand_in_dpo(weight, hidden, target, ref_input, ref_weight, beta=0.1):
    """Liger's DPO loss in plain torch (summed log-probs of the target tokens), for CPU."""
    def logps(h, w):
        token = (h @ w.T).float().log_softmax(-1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        return (token * (target != -100)).sum(-1)

    policy, ref = logps(hidden, weight), logps(ref_input, ref_weight)
    half = policy.shape[0] // 2
    margin = (policy[:half] - ref[:half]) - (policy[half:] - ref[half:])
    return torch.nn.functional.logsigmoid(beta * margin).neg().mean(), (policy[:half], policy[half:])


def test_liger_side_batches_pairs_and_trains_against_its_initial_reference(tmp_path):
    from transformers import AutoTokenizer

    from benchmarks.baseline_original import build_benchmark_dir, default_data_path
    from benchmarks.lib.presets import TRAIN_PRESETS
    from benchmarks.peer_liger import LigerDPO, encode_pairs
    from benchmarks.peer_trl import best_worst_pairs, write_pairs

    model_dir = build_benchmark_dir(TRAIN_PRESETS["cpu-smoke"], default_data_path(), tmp_path / "model")
    pairs_path = write_pairs(best_worst_pairs(default_data_path(), 4), tmp_path / "pairs.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    batch = encode_pairs(tokenizer, pairs[:2], max_length=64)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4  # chosen 1, chosen 2, rejected 1, rejected 2
    prompt = tokenizer(pairs[0]["query"]).input_ids
    assert batch["input_ids"][0, :len(prompt)].tolist() == prompt and (batch["labels"][0, :len(prompt)] == -100).all()
    assert batch["labels"][0, len(prompt)] != -100 and batch["labels"][2, len(prompt)] != -100
    spec = {"device": "cpu", "model_dir": str(model_dir), "pairs_path": str(pairs_path), "batch_size": 2,
            "grad_accum": 1, "max_length": 64, "warmup": 1, "steps": 1, "precision": "fp32"}
    side = LigerDPO(spec, PeakMemory("cpu").start(), loss_fn=_stand_in_dpo)
    assert side._micro_batch(0).item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at start
    times = side.train()
    assert len(times) == 2 and all(finite(wall, positive=True) for wall, _ in times)
    assert side._micro_batch(0).item() < math.log(2)  # trained towards the chosen responses
