"""Start-up time: from launching `python -m fastalign.train` to its first optimizer step, by phase,
next to the original approach's start-up (HF Trainer style) on the same model and data.

    python benchmarks/startup.py                       # the demo's tiny model and training split, 5 repeats
    python benchmarks/startup.py --records 50000       # a synthetic 50k-record file instead
    python benchmarks/startup.py --repeats 1 --out_dir /tmp/x     # a quick look

Every repeat is a fresh process (cold Python, warm OS file cache), started by this script; each
phase is the wall time of the trainer's own function for it, stamped in that process:

    imports        interpreter start + `import fastalign.train` (the original: torch, transformers
                   with Trainer/TrainingArguments/LlamaForCausalLM/AutoTokenizer, its loss code)
    process group  fastalign.distributed.init_distributed (the original: init_process_group, as
                   HF's TrainingArguments does under torchrun)
    tokenizer      load_tokenizer (AutoTokenizer.from_pretrained); 0 when the token cache hits
    data           load + validate + tokenize (fastalign.data.loading.load_groups, tokenizer excluded);
                   the original only parses the JSON here: its collator tokenizes during the steps
    model build    fastalign.alignment_model.build_model (meta build + weight load) / from_pretrained
    other setup    the rest of Trainer.setup (batch plan, optimizer, output dir, ...)
    first step     the first optimizer step (the original's includes its collator's tokenization)

fastalign is measured twice per repeat: with an empty token cache ("cold cache") and again with
the entry the first run wrote ("warm cache"). Medians over repeats with min-max spread; a shared
machine is noisy, so read the spread. Writes benchmarks/results/startup-<date>-<machine>-<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.machine import machine_info, machine_summary
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import format_table

REPO = Path(__file__).resolve().parents[1]
PHASES = ("imports", "process group", "tokenizer", "data", "model build", "other setup", "first step")

# Runs the trainer's own main() with timers around its phase functions; prints one JSON line.
FASTALIGN_PROBE = r"""
import importlib, json, sys, time
launched = float(sys.argv[1])
import fastalign.train as train
try:
    import fastalign.trainer as trainer  # the Trainer and the names it calls
except ImportError:  # an older --fastalign_tree keeps the Trainer in train.py
    trainer = train
imported = time.time()
from fastalign import distributed as fdist
from fastalign.cli import run_main
try:
    from fastalign.cli import exit_process
except ImportError:  # an older --fastalign_tree has no exit_process
    exit_process = sys.exit
spent = {}
def timed(owner, name, label):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.time() - start
    setattr(owner, name, wrapper)
timed(fdist, "init_distributed", "process group")
# The trainer's load_tokenizer: fastalign.model_dir's, or fastalign.model's in an older --fastalign_tree.
for module in ("fastalign.model_dir", "fastalign.model"):
    try:
        owner = importlib.import_module(module)
    except ImportError:
        continue
    if hasattr(owner, "load_tokenizer"):
        timed(owner, "load_tokenizer", "tokenizer")
timed(trainer, "load_groups", "data+tokenizer")
timed(trainer, "build_model", "model build")
first = {}
step = trainer.Trainer._train_step
def first_step(self, *args, **kwargs):
    start = time.time()
    out = step(self, *args, **kwargs)
    if not first:
        first.update(start=start, end=time.time())
    return out
trainer.Trainer._train_step = first_step
status = run_main(train.main, sys.argv[2:])
tokenizer = spent.get("tokenizer", 0.0)
phases = {"imports": imported - launched, "process group": spent["process group"], "tokenizer": tokenizer,
          "data": spent["data+tokenizer"] - tokenizer, "model build": spent["model build"],
          "first step": first["end"] - first["start"]}
phases["other setup"] = (first["start"] - imported
                         - sum(v for k, v in phases.items() if k not in ("imports", "first step")))
print("STARTUP " + json.dumps({"phases": phases, "to_first_step": first["end"] - launched, "status": status,
                               "source": train.__file__}))
exit_process(0)
"""

# The original approach's start-up: HF Trainer-style imports, tokenizer, raw JSON data, model,
# process group, then one optimizer step of groups tokenized by its collator.
ORIGINAL_PROBE = r"""
import importlib, json, sys, time
launched = float(sys.argv[1])
model_dir, data_path = sys.argv[2], sys.argv[3]
groups, num_comp, max_length = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
import random
import torch
import torch.distributed as dist
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: F401
from torch.nn.utils.rnn import pad_sequence
from benchmarks.baseline_original import AlignmentArgs, PaddedGroup, fp32_load_kwargs, original_compute_loss
phases = {"imports": time.time() - launched}
t = time.time()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
phases["process group"] = time.time() - t
t = time.time()
tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
phases["tokenizer"] = time.time() - t
t = time.time()
with open(data_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
phases["data"] = time.time() - t
t = time.time()
model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", trust_remote_code=False,
                                         **fp32_load_kwargs())
model.train()
phases["model build"] = time.time() - t
t = time.time()
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
phases["other setup"] = time.time() - t
t = time.time()
rng = random.Random(0)
def collate(record):
    # the original collator: sample num_comp candidates, tokenize query + response together,
    # mask the query's tokens, pad (id 0 here, masked) into [k, L]
    chosen = rng.sample(list(zip(record["responses"], record["scores"])), min(num_comp, len(record["responses"])))
    query_len = len(tokenizer(record["query"])["input_ids"])
    ids, labels = [], []
    for response, _ in chosen:
        full = tokenizer(record["query"] + response + tokenizer.eos_token, truncation=True,
                         max_length=max_length)["input_ids"]
        ids.append(torch.tensor(full))
        labels.append(torch.tensor([-100] * min(query_len, len(full)) + full[query_len:]))
    mask = [torch.ones(len(x), dtype=torch.bool) for x in ids]
    return PaddedGroup(pad_sequence(ids, batch_first=True), pad_sequence(mask, batch_first=True),
                       pad_sequence(labels, batch_first=True, padding_value=-100),
                       torch.tensor([[float(s) for _, s in chosen]]), sum(len(x) for x in ids))
for record in records[:groups]:  # one query per micro-batch, accumulated
    loss = original_compute_loss(model, collate(record), AlignmentArgs()) / groups
    loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
optimizer.step()
optimizer.zero_grad(set_to_none=True)
phases["first step"] = time.time() - t
print("STARTUP " + json.dumps({"phases": phases, "to_first_step": time.time() - launched, "status": 0}))
"""


def run_probe(code: str, args: list[str], tree: Path = REPO) -> dict:
    """One fresh process running `code` with fastalign imported from `tree`. It runs in `tree`:
    `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH, so from any
    other directory holding a fastalign/ that one would be measured instead."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys([str(tree), str(REPO)])), OMP_NUM_THREADS="1")
    launched = time.time()
    proc = subprocess.run([sys.executable, "-c", code, repr(launched), *args], capture_output=True, text=True,
                          cwd=tree, env=env, timeout=900)
    if proc.returncode != 0 or "STARTUP " not in proc.stdout:
        raise RuntimeError(f"probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.split("STARTUP ", 1)[1].splitlines()[0])
    if "source" in result and not Path(result["source"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"probe measured {result['source']}, not the tree {tree}")
    return result


def demo_inputs(work: Path, records: int | None) -> tuple[Path, Path, list[str]]:
    """The demo's tiny model and training split (or a synthetic file of `records` records), and the
    demo's training flags at one step."""
    from fastalign.data import sample_data_path
    from fastalign.demo import FULL, split_sample
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    model = build_tiny_llama(work / "tiny-llama", sandbox_texts(sample_data_path()), seed=0, **FULL.model)
    train, _, _ = split_sample(sample_data_path(), work, FULL.heldout_records, seed=0)
    if records:
        from benchmarks.data_pipeline import synthetic_records

        train = work / f"synthetic-{records}.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(records, seed=0)))
    flags = [*FULL.train_flags, "--model_max_length", str(FULL.model_max_length)]
    return model, train, flags


def summarize(runs: list[dict]) -> dict:
    rows = {}
    for name in (*PHASES, "to first step"):
        values = [r["to_first_step"] if name == "to first step" else r["phases"][name] for r in runs]
        rows[name] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--records", type=int, default=None,
                        help="A synthetic file of this many records instead of the demo's split.")
    parser.add_argument("--label", default=None, help="Suffix of the result file's name (e.g. before).")
    parser.add_argument("--out_dir", type=Path, default=None)
    parser.add_argument("--fastalign_tree", type=Path, default=None,
                        help="Measure the fastalign of this source tree (e.g. an earlier commit's `git archive`) "
                        "instead of this one's; one fastalign side, without the flags it lacks.")
    args = parser.parse_args(argv)
    tree = (args.fastalign_tree or REPO).resolve()
    flags_file = tree / "fastalign" / "config.py"
    if not flags_file.exists():  # an older --fastalign_tree: the flags are in train.py
        flags_file = tree / "fastalign" / "train.py"
    has_cache = "--token_cache_dir" in flags_file.read_text()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data, flags = demo_inputs(work, args.records)
        per_device = int(flags[flags.index("--per_device_train_batch_size") + 1])
        num_comp = int(flags[flags.index("--num_comp") + 1])
        max_length = flags[flags.index("--model_max_length") + 1]
        ours = ("fastalign, cold cache", "fastalign, warm cache") if has_cache else (f"fastalign ({tree.name})",)
        sides = {**{side: [] for side in ours}, "original (HF style)": []}
        for repeat in range(args.repeats):
            cache = work / f"cache-{repeat}"
            for n, side in enumerate(ours):
                train_flags = ["--model_name_or_path", str(model), "--data_path", str(data),
                               "--output_dir", str(work / f"out-{repeat}-{n}"), "--max_steps", "1",
                               "--save_strategy", "no", *flags]
                if has_cache:
                    train_flags += ["--disable_tqdm", "True", "--token_cache_dir", str(cache)]
                sides[side].append(run_probe(FASTALIGN_PROBE, train_flags, tree))
            sides["original (HF style)"].append(
                run_probe(ORIGINAL_PROBE, [str(model), str(data), str(per_device), str(num_comp), max_length]))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{side} {runs[-1]['to_first_step']:.2f}s" for side, runs in sides.items()), flush=True)

    summary = {side: summarize(runs) for side, runs in sides.items()}
    names = list(summary)
    rows = [[phase] + [f"{summary[s][phase]['median_s']:.2f} ({summary[s][phase]['min_s']:.2f}-"
                       f"{summary[s][phase]['max_s']:.2f})" for s in names] for phase in (*PHASES, "to first step")]
    info = machine_info("cpu")
    print(f"\nstart-up to the first optimizer step, seconds: median (min-max) of {args.repeats} fresh processes; "
          f"{machine_summary(info)}; data {data.name}")
    print(format_table(["phase", *names], rows))
    preset = (f"{args.records}rec" if args.records else "demo") + (f"-{args.label}" if args.label else "")
    payload = {**result_header("startup", preset, "cpu"), "fastalign_tree": str(tree), "data": data.name,
               "repeats": args.repeats,
               "summary": summary, "runs": sides}
    path = write_json(results_path("startup", preset, "cpu", args.out_dir), payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
