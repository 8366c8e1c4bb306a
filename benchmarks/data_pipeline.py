"""Data pipeline throughput: load, tokenize and pack one epoch of a synthetic sandbox file.

    python benchmarks/data_pipeline.py                      # 50k records, trained byte-level BPE
    python benchmarks/data_pipeline.py --tokenizer DIR      # a real tokenizer (e.g. a Llama model dir)
    python benchmarks/data_pipeline.py --records 40 --out_dir /tmp/x   # a few records: the script runs

Writes a synthetic JSONL file (and its .jsonl.gz twin) into a temporary directory, then times
`load_records` (both files), `tokenize_records`, and one epoch of `GroupBatcher.iter_steps` in the
seed's layout (1 group per micro-batch, 8 accumulation steps, num_comp 3) and with a token budget.
Prints a table and writes benchmarks/results/data_pipeline-<date>-<machine>-<preset>.json.
Reports wall and CPU time (all threads) per stage: the CPU column stays meaningful on a shared
machine, where wall time grows with the load average (printed). Memory: resident set size after
each stage (the tokenized groups are plain Python lists).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.lib.machine import machine_info, machine_summary
from benchmarks.lib.memory import rss_bytes
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import format_table
from fastalign import tiny
from fastalign.cli import run_main
from fastalign.data import GroupBatcher, load_records, tokenize_records
from fastalign.model_dir import load_tokenizer

WORDS = ("the a to of and in is it you that for be on with as are this not can but your if or they we "
         "would should people help feel safe honest kind harm legal friend money lost wallet return police "
         "answer question think understand important respect privacy consent advice careful alternative "
         "situation responsible community health support together information decision reason").split()


def synthetic_records(count: int, seed: int) -> list[dict]:
    """Sandbox-shaped records: Alpaca query, 3-5 responses of 20-200 words, scores 1..7."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array(WORDS)

    def text(low: int, high: int) -> str:
        return " ".join(vocabulary[rng.integers(0, len(vocabulary), size=int(rng.integers(low, high)))])

    records = []
    for i in range(count):
        k = int(rng.integers(3, 6))
        records.append({
            "query": f"### Instruction:\n{text(8, 60)}?\n\n### Response:",
            "responses": [text(20, 200) + "." for _ in range(k)],
            "scores": rng.integers(1, 8, size=k).tolist(),
            "models": ["synthetic"] * k,
            "category": f"c{i % 5}",
        })
    return records


def build_tokenizer(directory: pathlib.Path, records: list[dict]):
    """A byte-level BPE (vocab 8k) trained on part of the synthetic text, saved and reloaded."""
    texts = [t for r in records[:2000] for t in [r["query"], *r["responses"]]]
    return load_tokenizer(tiny.build_tokenizer(texts, 8000, directory))


def timed(fn):
    """(result, wall seconds, CPU seconds of this process: all threads, e.g. the tokenizer's)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: train a byte-level BPE)")
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument("--max_tokens_per_batch", type=int, default=8192)
    parser.add_argument("--preset", default=None, help="name in the result file (default: <records>rec)")
    parser.add_argument("--out_dir", "--out-dir", type=pathlib.Path, default=None,
                        help="where the JSON goes (default benchmarks/results/)")
    args = parser.parse_args(argv)
    preset = args.preset or (f"{args.records // 1000}k" if args.records >= 1000 else f"{args.records}rec")

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        records = synthetic_records(args.records, seed=0)
        jsonl = tmp / "sandbox.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        gz = tmp / "sandbox.jsonl.gz"
        gz.write_bytes(gzip.compress(jsonl.read_bytes(), compresslevel=6))
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
            tokenizer_name = args.tokenizer
        else:
            tokenizer = build_tokenizer(tmp / "tokenizer", records)
            tokenizer_name = "byte-level BPE, vocab 8000, trained on the synthetic text"
        del records
        rss_start = rss_bytes()

        load_before = os.getloadavg()[0]
        loaded, *seconds = timed(lambda: load_records(jsonl))
        rows.append(("load .jsonl", *seconds, len(loaded.records), "records", rss_bytes()))
        _, *seconds = timed(lambda: load_records(gz))
        rows.append(("load .jsonl.gz", *seconds, len(loaded.records), "records", rss_bytes()))

        data, *seconds = timed(lambda: tokenize_records(loaded, tokenizer, model_max_length=args.model_max_length))
        tokenized = data.stats["query_tokens"] + data.stats["response_tokens"]
        rows.append(("tokenize", *seconds, tokenized, "tokens", rss_bytes()))

        layouts = {
            "pack epoch: 1 group/micro, accum 8": dict(batch_size=1, gradient_accumulation_steps=8),
            f"pack epoch: {args.max_tokens_per_batch} tokens/micro": dict(
                batch_size=None, max_tokens_per_batch=args.max_tokens_per_batch),
        }
        for name, layout in layouts.items():
            def epoch(layout=layout):
                batcher = GroupBatcher(data, num_comp=3, seed=42, **layout)
                micro = tokens = 0
                for step in batcher.iter_steps(epoch=0):
                    micro += len(step.micro_batches)
                    tokens += sum(b.num_tokens for b in step.micro_batches)
                return micro, tokens
            (micro, tokens), *seconds = timed(epoch)
            rows.append((name, *seconds, tokens, f"tokens in {micro} micro-batches", rss_bytes()))
            results[name] = {"micro_batches": micro, "tokens": tokens}

    load_after = os.getloadavg()[0]
    table_rows = [(stage, f"{wall:.2f} s", f"{cpu:.2f} s", count, unit, f"{count / wall:,.0f}/s",
                   f"{rss / 2**20:,.0f} MiB")
                  for stage, wall, cpu, count, unit, rss in rows]
    seed_path = [r for r in rows if r[0] in ("load .jsonl", "tokenize") or "1 group/micro" in r[0]]
    total_wall, total_cpu = sum(r[1] for r in seed_path), sum(r[2] for r in seed_path)
    info = machine_info("cpu")
    print(f"data pipeline, {args.records} records, {machine_summary(info)}; tokenizer: {tokenizer_name}")
    print(f"1-minute load average {load_before:.1f} before, {load_after:.1f} after "
          "(shared machine: wall > CPU when busy)")
    print(format_table(("stage", "wall", "CPU", "count", "unit", "rate (wall)", "RSS after"), table_rows))
    print(f"load .jsonl + tokenize + pack one epoch (seed layout): {total_wall:.2f} s wall, {total_cpu:.2f} s CPU")

    payload = {
        **result_header("data_pipeline", preset, "cpu"),
        "records": args.records,
        "tokenizer": tokenizer_name,
        "model_max_length": args.model_max_length,
        "load_average_before_after": [load_before, load_after],
        "tokenization_stats": data.stats,
        "rss_before_load_bytes": rss_start,
        "stages": [{"stage": stage, "wall_seconds": wall, "cpu_seconds": cpu, "count": count, "unit": unit,
                    "rss_after_bytes": rss} for stage, wall, cpu, count, unit, rss in rows],
        "load_tokenize_pack_seconds": {"wall": total_wall, "cpu": total_cpu},
        "layouts": results,
    }
    path = write_json(results_path("data_pipeline", preset, "cpu", args.out_dir), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # a refused --tokenizer directory: one error: line, exit 2
