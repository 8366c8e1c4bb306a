"""Host memory while loading a Llama checkpoint: fastalign vs transformers.

Target (docs/design.md section 5): `Llama.from_pretrained` reads each weight once and peaks
below 1.2x the model's size in its target dtype in host memory.

A random Llama of a few hundred MB is saved (bf16, as released checkpoints are) as one
safetensors file, as sharded safetensors and as a legacy pytorch_model.bin. Each load runs in its
own fresh process: peak RSS (VmHWM) minus RSS just before the load (after imports), against the
bytes of the loaded parameters. The processes start together (their imports paid side by side,
once on a machine with a core per process), then load one at a time, so no load is timed or
metered beside another. Both loaders read the weights through file mappings (the
safetensors library, torch.load mmap=True), so bytes read show in no read() counter: a mapping's
pages that stay resident show in the peak instead. transformers' `LlamaForCausalLM.from_pretrained`
on the same files is the baseline.

    python benchmarks/load_memory.py                 # ~310 MB bf16 model (150M parameters)
    python benchmarks/load_memory.py --layers 2      # smaller, quicker
    python benchmarks/load_memory.py --layouts sharded,bin   # only these layouts' loads
    python benchmarks/load_memory.py --preset smoke --out_dir /tmp/x   # a toy model: the script runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lib.machine import machine_summary
from benchmarks.lib.memory import PeakMemory
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import fmt_bytes, format_table
from benchmarks.lib.workers import Worker, serve

TARGET_RATIO = 1.2

LAYOUTS = ("safetensors", "sharded", "bin")
CASES = [  # (layout, target dtype, loader)
    ("safetensors", "bfloat16", "fastalign"), ("safetensors", "bfloat16", "transformers"),
    ("safetensors", "float32", "fastalign"), ("safetensors", "float32", "transformers"),
    ("sharded", "bfloat16", "fastalign"), ("bin", "bfloat16", "fastalign"),
]


# Model shape (besides --layers), shard size of the sharded layout, and the loads to measure.
# `smoke` is a toy model that only checks the script runs (each layout and loader once, bf16: every
# load is a fresh process, seconds of imports each): at its size library allocations dwarf the
# weights, so its ratios say nothing about the target.
PRESETS = {
    "default": dict(model=dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                               num_key_value_heads=4), shard_bytes=100 * 10**6, cases=CASES),
    "smoke": dict(model=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2), shard_bytes=100_000,
                  cases=[case for case in CASES if case[1] == "bfloat16"]),
}


def load(loader: str, path: str, dtype: str) -> dict:
    """Child side: one load, measured."""
    import torch

    torch_dtype = getattr(torch, dtype)
    mem = PeakMemory("cpu").reset()
    start = time.perf_counter()
    if loader == "fastalign":
        from fastalign.model import Llama

        model = Llama.from_pretrained(path, dtype=torch_dtype)
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(path, dtype=torch_dtype)
    seconds = time.perf_counter() - start
    peak_bytes = mem.peak_bytes()
    # A loader may leave weights as views of a mapped file, resident only once touched: touch
    # every weight (as the first forward pass would) and report that peak too.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "peak_bytes": peak_bytes, "peak_after_use_bytes": mem.peak_bytes(),
            "model_bytes": model_bytes, "memory": mem.describe()}


def serve_loads() -> int:
    import torch  # noqa: F401  (imported before the measured region: its memory is baseline)
    import transformers  # noqa: F401

    import fastalign.model  # noqa: F401

    return serve({"ready": lambda: {"ok": True}, "load": load})


def build_checkpoints(root: Path, layers: int, preset: dict,
                      layouts: Sequence[str] = LAYOUTS) -> tuple[dict[str, Path], int]:
    """The same random bf16 weights in the given layouts (of LAYOUTS); returns their dirs and the
    weights' bytes."""
    import torch

    from fastalign.hf_config import LlamaConfig
    from fastalign.hf_weights import hf_name
    from fastalign.model import Llama

    config = LlamaConfig(**preset["model"], num_hidden_layers=layers, max_position_embeddings=4096)
    model = Llama(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(torch.bfloat16)
    dirs = {"safetensors": root / "single", "sharded": root / "sharded", "bin": root / "bin"}
    if {"safetensors", "bin"} & set(layouts):  # the .bin layout takes this one's config.json
        model.save_pretrained(dirs["safetensors"])
    if "sharded" in layouts:
        model.save_pretrained(dirs["sharded"], max_shard_size=preset["shard_bytes"])
    if "bin" in layouts:
        dirs["bin"].mkdir()
        torch.save({hf_name(k): v for k, v in model.state_dict().items()}, dirs["bin"] / "pytorch_model.bin")
        (dirs["bin"] / "config.json").write_text((dirs["safetensors"] / "config.json").read_text())
    file_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {layout: dirs[layout] for layout in layouts}, file_bytes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8: ~150M parameters)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="model shape: default (hidden 1024, vocab 32000) or smoke (a toy model)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated layouts to load (default all: {','.join(LAYOUTS)})")
    parser.add_argument("--out_dir", "--out-dir", type=Path, default=None,
                        help="where the JSON goes (default benchmarks/results/)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_loads()
    layouts = [layout for layout in LAYOUTS if layout in args.layouts.split(",")]
    unknown = set(args.layouts.split(",")) - set(LAYOUTS)
    if unknown or not layouts:
        parser.error(f"--layouts: choose from {','.join(LAYOUTS)} (got {args.layouts!r})")

    # A selection of layouts gets its own file name, so it never overwrites a full run's figures.
    preset_name = (("" if args.preset == "default" else f"{args.preset}-") + f"{args.layers}layers"
                   + ("" if len(layouts) == len(LAYOUTS) else "-" + "-".join(layouts)))
    header = result_header("load_memory", preset_name, "cpu")
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="fastalign-load-") as tmp:
        cases = [case for case in PRESETS[args.preset]["cases"] if case[0] in layouts]
        # One fresh process per load, all started at once: each imports while the checkpoints are
        # built, and `ready` waits until every one has, so that the loads run alone.
        workers = [Worker([str(Path(__file__).resolve()), "--serve"]) for _ in cases]
        try:
            for worker in workers:
                worker.start()
            dirs, checkpoint_bytes = build_checkpoints(Path(tmp), args.layers, PRESETS[args.preset], layouts)
            for worker in workers:
                worker.send("ready")
            for worker in workers:
                worker.receive("ready")
            replies = []
            for worker, (layout, dtype, loader) in zip(workers, cases):
                replies.append(worker.call("load", loader=loader, path=str(dirs[layout]), dtype=dtype))
                worker.close()  # its memory back before the next load
        finally:
            for worker in workers:
                worker.close()
        for r, (layout, dtype, loader) in zip(replies, cases):
            ratio = r["peak_bytes"] / r["model_bytes"]
            ratio_after_use = r["peak_after_use_bytes"] / r["model_bytes"]
            r.update(layout=layout, dtype=dtype, loader=loader, ratio=ratio, ratio_after_use=ratio_after_use)
            results.append(r)
            rows.append([loader, layout, dtype, fmt_bytes(r["model_bytes"]), fmt_bytes(r["peak_bytes"]),
                         f"{ratio:.2f}x", f"{ratio_after_use:.2f}x", f"{r['seconds']:.2f} s"])

    print(f"load_memory on {machine_summary(header['machine'])}; checkpoint {fmt_bytes(checkpoint_bytes)} bf16")
    print(format_table(["loader", "layout", "target dtype", "model", "peak RSS above base", "peak/model",
                        "after use/model", "time"], rows))
    met = all(max(r["ratio"], r["ratio_after_use"]) < TARGET_RATIO for r in results if r["loader"] == "fastalign")
    print(f"target: every fastalign load peaks below {TARGET_RATIO}x the model: {'met' if met else 'MISSED'}")
    path = write_json(results_path("load_memory", preset_name, "cpu", args.out_dir),
                      {**header, "checkpoint_bytes": checkpoint_bytes, "target_ratio": TARGET_RATIO,
                       "target_met": met, "results": results})
    print(f"wrote {path}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
