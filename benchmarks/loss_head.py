"""Loss-head benchmark: forward+backward time and peak memory of the Stable Alignment loss head.

    python benchmarks/loss_head.py --preset cpu           # T=8192 H=1024 V=32000 fp32 (heavy)
    python benchmarks/loss_head.py --preset cpu-small     # a quick look
    PYTHONPATH=. python benchmarks/loss_head.py --preset gpu   # H100 targets, bf16
    python benchmarks/loss_head.py --tokens 4096 --hidden 512 --vocab 32000 --k 4 --dtype float32

The loss head is everything after the final norm: hidden [T, H] and lm_head weight [V, H] in,
the alignment loss out, then backward to grad_hidden and grad_weight. Every method computes the
same number (the parent prints each method's loss; they agree to rounding) on one packed batch
of T tokens: groups of k responses, sequences of --seq-len tokens of which the first
--query-frac are query positions (target -100, as in real data), ratings drawn from 1..7.

Methods (each where available):
- fastalign:   fastalign.loss.stable_alignment_loss(backend="auto"): Triton on CUDA, the PyTorch
               twin on CPU; streams the vocabulary, drops -100 positions before any GEMM and
               skips responses with no gradient in the backward pass.
- full_logits: the original code's approach (packed, i.e. without its padding, which only helps
               it): [T, V] logits, log_softmax in fp32, gather, per-response means, group loss.
- chunked_torch: 512-token chunks, each under torch.utils.checkpoint (logits of one chunk live at
               a time, recomputed in backward): the usual plain-PyTorch memory fix.
- torch_linear_ce: torch.nn.functional.linear_cross_entropy(reduction='none') with
               LinearCrossEntropyOptions() (torch's chunked fused path), + per-response means.
- liger:       Liger-Kernel's fused linear cross entropy (reduction='none'), + per-response means.
The group part (best, margins, penalty) of the baselines is fastalign.kernels.group_math under autograd.

Method. Each method runs in its own child process (benchmarks.lib.workers.Worker); all of them start
together (interpreter, imports and CUDA start-up paid in parallel, once), then each case's workers
build their inputs and run one untimed warm-up step together; then, one method at a time, the
peak-memory step, then timed steps interleaved across methods (A B C A B C ...) so load changes
on a shared machine hit all alike. A method that could run here and fails gets a `failed` row
(its first error line), the others are still measured and written, and the script ends with an
`error:` line and exit status 2. The median is
reported, with the process CPU-time ratio beside it (on a shared CPU machine the wall time also
measures the neighbours; on CUDA the CPU time only measures launch overhead). Peak memory is the
loss head's extra memory above its inputs: CUDA max_memory_allocated minus the bytes allocated
before the step; on CPU the peak RSS (VmHWM) minus the RSS before the step, in a process of its
own (benchmarks.lib.memory.PeakMemory). Gradients are freed before each step, so grad_hidden and
grad_weight (the same for every method) count.
Results: a table on stdout and JSON in benchmarks/results/loss_head-<date>-<device>-<preset>.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.machine import machine_summary
from benchmarks.lib.memory import PeakMemory
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import fmt_bytes, format_table
from benchmarks.lib.timing import summarize_times, timed
from benchmarks.lib.workers import Worker, error_line, serve
from fastalign.errors import FastalignError

METHODS = ("fastalign", "full_logits", "chunked_torch", "torch_linear_ce", "liger")
CHUNKED_TOKENS = 512


@dataclass(frozen=True)
class Case:
    tokens: int
    hidden: int
    vocab: int
    k: int = 4
    dtype: str = "float32"
    seq_len: int = 256
    query_frac: float = 0.25
    repeats: int = 3
    methods: tuple[str, ...] | None = None  # None: the preset's methods


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(device="cpu", methods=("fastalign", "full_logits", "torch_linear_ce"),
                cases=[Case(8192, 1024, 32000, repeats=3)]),
    "cpu-small": dict(device="cpu", methods=("fastalign", "full_logits", "chunked_torch",
                                             "torch_linear_ce"),
                      cases=[Case(2048, 256, 32000, repeats=3)]),
    # The H100 target first, against every method; then Llama-3 / Llama-2 vocabularies against
    # the two plain-PyTorch approaches (kept short: `make gpu-check` gives this stage 120 s).
    "gpu": dict(device="cuda", methods=METHODS,
                cases=[Case(8192, 4096, 131072, dtype="bfloat16", repeats=10),
                       Case(8192, 4096, 128256, dtype="bfloat16", repeats=5,
                            methods=("fastalign", "full_logits", "chunked_torch")),
                       Case(8192, 4096, 32000, dtype="bfloat16", repeats=5,
                            methods=("fastalign", "full_logits", "chunked_torch"))]),
}


# ----------------------------------------------------------------------------- child side

_STATE: dict[str, Any] = {}


def make_inputs(case: Case, device: str) -> dict[str, Any]:
    """The packed batch of one case (deterministic; identical in every worker)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    num_seqs = max(case.tokens // case.seq_len, 1)
    num_groups = max(num_seqs // case.k, 1)
    num_seqs = num_groups * case.k
    lengths = torch.full((num_seqs,), case.tokens // num_seqs)
    lengths[: case.tokens - int(lengths.sum())] += 1
    response_index = torch.repeat_interleave(torch.arange(num_seqs), lengths)
    targets = torch.randint(0, case.vocab, (case.tokens,), generator=gen)
    starts = torch.cumsum(lengths, 0) - lengths
    for s, n in zip(starts.tolist(), lengths.tolist()):
        query = max(1, int(n * case.query_frac))
        targets[s: s + query - 1] = -100
        targets[s + n - 1] = -100
    dtype = getattr(torch, case.dtype)
    device_gen = torch.Generator(device).manual_seed(1)  # big tensors are drawn where they live
    hidden = torch.randn(case.tokens, case.hidden, generator=device_gen, device=device).to(dtype)
    weight = (torch.randn(case.vocab, case.hidden, generator=device_gen, device=device)
              / math.sqrt(case.hidden)).to(dtype)
    return dict(hidden=hidden.requires_grad_(True), weight=weight.requires_grad_(True),
                targets=targets.to(device), response_index=response_index.to(device),
                scores=torch.randint(1, 8, (num_seqs,), generator=gen).float().to(device),
                group_index=torch.arange(num_seqs).div(case.k, rounding_mode="floor").to(device),
                num_target_tokens=int((targets != -100).sum()))


def _group_loss(token_nll, batch):
    """Baselines: per-response means of per-token NLL (0 at -100), then the group loss."""
    import torch

    from fastalign.kernels.group_math import GroupOptions, build_group_layout, group_math

    num_responses = batch["scores"].numel()
    has_target = (batch["targets"] != -100).float()
    sums = torch.zeros(num_responses, device=token_nll.device).index_add(
        0, batch["response_index"], token_nll.float() * has_target)
    counts = torch.zeros(num_responses, device=token_nll.device).index_add(
        0, batch["response_index"], has_target)
    layout = build_group_layout(batch["group_index"], int(batch["group_index"].max()) + 1)
    return group_math(sums / counts, batch["scores"], layout, GroupOptions()).loss_per_group.mean()


def loss_fastalign(batch):
    from fastalign.loss import stable_alignment_loss

    return stable_alignment_loss(batch["hidden"], batch["weight"], batch["targets"],
                                 batch["response_index"], batch["scores"], batch["group_index"]).loss


def loss_full_logits(batch):
    import torch

    logits = batch["hidden"] @ batch["weight"].T  # [T, V], the original's full logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_nll = -logprobs.gather(1, batch["targets"].clamp(min=0)[:, None]).squeeze(1)
    return _group_loss(token_nll, batch)


def loss_chunked_torch(batch):
    import torch
    from torch.utils.checkpoint import checkpoint

    def chunk_nll(hidden, targets):
        logits = (hidden @ batch["weight"].T).float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    pieces = [checkpoint(chunk_nll, h, t, use_reentrant=False)
              for h, t in zip(batch["hidden"].split(CHUNKED_TOKENS),
                              batch["targets"].split(CHUNKED_TOKENS))]
    return _group_loss(torch.cat(pieces), batch)


def loss_torch_linear_ce(batch):
    import torch

    token_nll = torch.nn.functional.linear_cross_entropy(
        batch["hidden"], batch["weight"], batch["targets"], reduction="none",
        options=torch.nn.LinearCrossEntropyOptions())
    return _group_loss(token_nll, batch)


def loss_liger(batch):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    head = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=-100)
    return _group_loss(head(batch["weight"], batch["hidden"], batch["targets"]), batch)


def available(method: str, device: str) -> str | None:
    """None when the method can run here, else why not."""
    import torch

    if method == "torch_linear_ce" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked linear_cross_entropy"
    if method == "liger":
        if device != "cuda":
            return "Liger-Kernel needs CUDA"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel not installed"
    return None


def _step(batch, method):
    batch["hidden"].grad = None
    batch["weight"].grad = None
    loss = globals()[f"loss_{method}"](batch)
    loss.backward()
    return float(loss.detach())


def handle_setup(case: dict[str, Any], device: str, method: str) -> dict[str, Any]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True  # what training runs with (docs/design.md section 5)
    case = Case(**{**case, "methods": None})
    _STATE.update(case=case, device=device, method=method, batch=make_inputs(case, device))
    loss = _step(_STATE["batch"], method)  # warm-up (Triton compile, allocator, page faults)
    return {"loss": loss, "num_target_tokens": _STATE["batch"]["num_target_tokens"]}


def handle_memory() -> dict[str, Any]:
    import torch

    batch, device = _STATE["batch"], _STATE["device"]
    batch["hidden"].grad = batch["weight"].grad = None
    meter = PeakMemory(device).reset()
    before = torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else 0
    _step(batch, _STATE["method"])
    return {"peak_extra_bytes": meter.peak_bytes() - before, "memory_method": meter.describe()}


def handle_time() -> dict[str, Any]:
    cpu_start = time.process_time()
    _, seconds = timed(lambda: _step(_STATE["batch"], _STATE["method"]), _STATE["device"])
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu_start}


# ----------------------------------------------------------------------------- parent side


def handle_ready(device: str) -> dict[str, Any]:
    """Imports and the device's start-up (CUDA context), paid by every worker at the same time."""
    import torch

    torch.zeros(1, device=device)
    return {"ok": True}


def start_workers(plan: list[tuple[Case, str]], device: str) -> dict[tuple[int, str], Worker]:
    """One worker per (case index, method), all started and made ready together: each pays the
    interpreter's and CUDA's start-up, and in parallel that is paid once, not once per method."""
    workers = {(index, method): Worker([str(Path(__file__).resolve()), "--worker"]).start()
               for index, (_, method) in enumerate(plan)}
    for worker in workers.values():
        worker.send("ready", device=device)
    for worker in workers.values():
        worker.receive("ready")
    return workers


def run_case(case: Case, device: str, workers: dict[str, Worker], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """Set up every method's worker together, then the memory step, then timed steps interleaved
    across methods. A method that fails gets a `failed` row (its first error line) and is dropped."""
    rows: dict[str, dict[str, Any]] = {method: {"method": method, "skipped": why} for method, why in skipped.items()}
    live = dict(workers)

    for method, worker in live.items():  # inputs and the warm-up step, all methods at once
        worker.send("setup", case=asdict(case), device=device, method=method)
    setups = {}
    for method in list(live):
        try:
            setups[method] = live[method].receive("setup")
        except RuntimeError as err:
            rows[method] = {"method": method, "failed": f"setup: {error_line(str(err))}"}
            print(f"{method} failed in setup:\n{err}", file=sys.stderr)
            live.pop(method).close()
    for method, setup in setups.items():
        rows[method] = {"method": method, "loss": setup["loss"], "num_target_tokens": setup["num_target_tokens"],
                        "times": [], "cpu_times": []}
    def one_at_a_time(cmd: str) -> dict[str, dict[str, Any]]:
        # Measuring: one method computes at a time, so none is timed or metered beside another.
        replies = {}
        for method in list(live):
            try:
                replies[method] = live[method].call(cmd)
            except RuntimeError as err:
                rows[method] = {"method": method, "failed": f"{cmd}: {error_line(str(err))}"}
                print(f"{method} failed in {cmd}:\n{err}", file=sys.stderr)
                live.pop(method).close()
        return replies

    for method, memory in one_at_a_time("memory").items():
        rows[method].update(memory)
    for _ in range(case.repeats):  # A B C A B C ...
        for method, reply in one_at_a_time("time").items():
            rows[method]["times"].append(reply["seconds"])
            rows[method]["cpu_times"].append(reply["cpu_seconds"])
    for worker in live.values():
        worker.close()
    ordered = sorted(rows.values(), key=lambda row: METHODS.index(row["method"]))
    for row in ordered:
        if "times" in row:
            row["time"] = summarize_times(row.pop("times"))
            row["process_cpu_time"] = summarize_times(row.pop("cpu_times"))
    return ordered


def print_table(case: Case, rows: list[dict[str, Any]]) -> None:
    measured = {r["method"]: r for r in rows if "time" in r}
    base = measured.get("full_logits")
    table = []
    for row in rows:
        if "time" not in row:
            table.append([row["method"], None, None, None, None, None, None,
                          row.get("skipped") or f"FAILED: {row['failed']}"])
            continue
        t, mem = row["time"]["median_s"], row["peak_extra_bytes"]
        cpu_t = row["process_cpu_time"]["median_s"]
        table.append([row["method"], f"{t * 1e3:.1f}", fmt_bytes(mem),
                      f"{t / base['time']['median_s']:.2f}x" if base else None,
                      f"{cpu_t / base['process_cpu_time']['median_s']:.2f}x" if base else None,
                      f"{mem / base['peak_extra_bytes']:.3f}x" if base and base["peak_extra_bytes"] else None,
                      f"{row['loss']:.5f}", ""])
    print(f"\nT={case.tokens} H={case.hidden} V={case.vocab} k={case.k} {case.dtype} "
          f"(seq_len {case.seq_len}, query_frac {case.query_frac})")
    print(format_table(["method", "fwd+bwd ms", "peak extra", "time/full", "cpu-time/full",
                        "mem/full", "loss", "note"], table))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--k", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--query-frac", type=float)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out_dir", "--out-dir", type=Path, default=None,
                        help="where the JSON goes (default benchmarks/results/)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return serve({"ready": handle_ready, "setup": handle_setup, "memory": handle_memory, "time": handle_time})

    import torch

    preset = dict(PRESETS[args.preset or ("gpu" if torch.cuda.is_available() else "cpu-small")])
    overrides = {name: getattr(args, name) for name in ("tokens", "hidden", "vocab", "k", "dtype",
                                                        "seq_len", "query_frac", "repeats")
                 if getattr(args, name) is not None}
    cases = [replace(case, **overrides) for case in preset["cases"]]
    device = args.device or preset["device"]
    methods = tuple(args.methods.split(",")) if args.methods else preset["methods"]
    if args.methods:  # an explicit choice applies to every case
        cases = [replace(case, methods=None) for case in cases]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    preset_name = (args.preset or "custom") + "".join(  # overrides show in the result file name
        f"-{name.replace('_', '')}{value}" for name, value in overrides.items())

    payload = result_header("loss_head", preset_name, device)
    payload["cases"] = []
    print(f"machine: {machine_summary(payload['machine'])}")
    plan, skipped = [], []
    for case in cases:
        why_not = {m: available(m, device) for m in case.methods or methods}
        skipped.append({m: why for m, why in why_not.items() if why})
        plan += [(case, m) for m, why in why_not.items() if not why]
    workers = start_workers(plan, device)
    failed = []
    try:
        for index, case in enumerate(cases):
            mine = {m: w for (i, m), w in workers.items() if plan[i][0] is case}
            rows = run_case(case, device, mine, skipped[index])
            print_table(case, rows)
            payload["cases"].append({"case": asdict(case), "results": rows})
            path = write_json(results_path("loss_head", preset_name, device, args.out_dir), payload)
            failed += [f"{row['method']} (T={case.tokens} V={case.vocab}) {row['failed']}" for row in rows
                       if "failed" in row]
    finally:
        for worker in workers.values():
            worker.close()
    print(f"\nwrote {path}")
    if failed:  # a method that could run here and did not: the benchmark failed, whatever the others did
        raise FastalignError(f"loss_head: {len(failed)} method run(s) failed; first: {failed[0]}")
    return 0


if __name__ == "__main__":
    from fastalign.cli import run_main

    sys.exit(run_main(main))
