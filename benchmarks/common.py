"""Shared helpers for the benchmark scripts: machine description, timing, peak memory, MFU,
result files, tables, and isolated worker processes.

Scripts are run as `python benchmarks/<name>.py` (or with `PYTHONPATH=.` on a GPU machine); each
starts with the two lines below so that `benchmarks.common` and `fastalign` import from the tree:

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks.common import ...

Memory conventions (the same for every benchmark):
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` (allocator bytes,
  so caching slack and the CUDA context are not counted).
- CPU: peak resident set size (VmHWM) of a process that runs one side only, over the measured
  steps, minus its resident set after imports and data preparation (before the model is built):
  weights, gradients, optimizer state and activations count, load-time transients do not. Linux
  resets VmHWM when "5" is written to /proc/self/clear_refs (after the warm-up steps, with freed
  heap given back first); where that is refused the peak since process start is used and the JSON
  says so (`peak_reset: false`). Such processes run with MALLOC_MMAP_THRESHOLD_ fixed so that
  freed large blocks leave the RSS.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# ----------------------------------------------------------------------------- dates and names


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def utc_date() -> str:
    return utc_now().strftime("%Y-%m-%d")


def slug(text: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3` (safe in file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_tag(device: "str | Any") -> str:
    """Short device name for result file names: `cpu-2c` or the GPU name slug."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{_cpu_count()}c"


def results_path(benchmark: str, preset: str, device: "str | Any", out_dir: Path | None = None) -> Path:
    """benchmarks/results/<benchmark>-<date>-<device>-<preset>.json (the date is UTC)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    return out_dir / f"{benchmark}-{utc_date()}-{device_tag(device)}-{preset}.json"


# ----------------------------------------------------------------------------- machine


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # absent or broken install: report it as missing, do not fail the benchmark
        return None
    return getattr(mod, "__version__", "unknown")


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def machine_info(device: "str | Any" = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU, memory, GPU, library versions, source commit."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": _mem_total_bytes(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flash_attn": _version("flash_attn"),
        "git_commit": _git_commit(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_mem_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            peak_bf16_tflops=peak_bf16_tflops(props.name),
        )
    return info


def machine_summary(info: dict[str, Any]) -> str:
    """One line for tables and RESULTS.md."""
    if "gpu_name" in info:
        return f"1x {info['gpu_name']}, torch {info['torch']}"
    return f"{info['cpu_model']} ({info['cpu_count']} cores), torch {info['torch']}"


# ----------------------------------------------------------------------------- timing


def synchronize(device: "str | Any") -> None:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: "str | Any") -> tuple[Any, float]:
    """Run fn once; return (its result, wall seconds) with the device synchronised on both ends."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of no values")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def summarize_times(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": median(times), "min_s": min(times), "max_s": max(times), "mean_s": sum(times) / len(times),
            "n": len(times)}


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()  # no /proc: the best available upper bound


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM, else ru_maxrss)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """Give freed heap memory back to the OS (glibc malloc_trim), so RSS tracks live memory."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


# Child processes measured by RSS get this malloc setting: large blocks are mmap'd and unmapped on
# free instead of staying in the heap, so a freed activation does not inflate later RSS readings.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@dataclass
class PeakMemory:
    """Peak memory of a training loop on one device (see the module docstring).

    Call `start()` after imports and data preparation, build the model, run the warm-up steps,
    then `reset_peak()` and the measured steps; `peak_bytes()` is then the steady-state training
    peak: CUDA: max allocated bytes since reset_peak (absolute, so weights, gradients and optimizer
    state on the GPU count); CPU: peak RSS since reset_peak minus the RSS at start (again weights,
    optimizer state and everything the model holds count; load-time transients do not).
    """

    device: Any
    base_bytes: int = 0
    peak_reset: bool = True

    def start(self) -> "PeakMemory":
        import torch

        self.device = torch.device(self.device)
        if self.device.type == "cpu":
            release_free_heap()
            self.base_bytes = rss_bytes()
        return self.reset_peak()

    reset = start  # measure from now on (base and peak both reset)

    def reset_peak(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_heap()
            self.peak_reset = reset_peak_rss()
        return self

    def peak_bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(peak_rss_bytes() - self.base_bytes, 0)

    def describe(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"method": "torch.cuda.max_memory_allocated since reset_peak_memory_stats"}
        return {"method": "VmHWM since the last peak reset (malloc_trim, clear_refs) - VmRSS at start "
                          "(own process)", "peak_reset": self.peak_reset,
                "base_rss_bytes": self.base_bytes, "env": CPU_MEMORY_ENV}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ----------------------------------------------------------------------------- FLOPs and MFU


def peak_bf16_tflops(device_name: str) -> float | None:
    """Peak dense bf16 tensor-core TFLOP/s of a GPU (without sparsity; vendor data sheets: H100 SXM
    989, H100 PCIe 756, H200 989, A100 312, ...), matched by name; None when unknown. The table is
    the trainer's (`fastalign.train.PEAK_BF16_TFLOPS`), so its logged MFU and the benchmarks' agree."""
    from fastalign.train import PEAK_BF16_TFLOPS

    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(flops_per_second: float, device: "str | Any") -> float | None:
    """Model FLOPs utilisation against the device's peak dense bf16 throughput (None on CPU).

    Count model FLOPs of real tokens only (fastalign.hf_config.LlamaConfig.flops_per_token: 6 x the
    matmul parameters before sharding, embeddings excluded, plus causal attention), so padding
    earns no credit and two implementations of the same step get the same FLOPs."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else flops_per_second / (peak * 1e12)


# ----------------------------------------------------------------------------- output


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write atomically (tmp + rename) so a killed run never leaves half a JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def result_header(benchmark: str, preset: str, device: "str | Any") -> dict[str, Any]:
    """The fields every result JSON starts with."""
    return {
        "benchmark": benchmark,
        "preset": preset,
        "date_utc": utc_now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.executable).name] + [_rel(a) for a in sys.argv]),
        "machine": machine_info(device),
    }


def _rel(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(REPO_ROOT)) if Path(arg).exists() else arg
    except ValueError:
        return arg


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A fixed-width text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[0-9][0-9.,eE+-]*(x|%| B| [KMG]iB| s)?", text))


# ----------------------------------------------------------------------------- worker processes

_REPLY = "@@fastalign-bench@@ "


@dataclass
class Worker:
    """A child Python process that serves commands over stdin/stdout, one JSON line each way.

    Used to give each side of a comparison its own process (clean peak-RSS accounting, no shared
    allocator) while the parent interleaves their steps. The child runs `serve(handlers)`.
    Anything else the child prints to stdout (library chatter) is passed through to stderr.
    """

    argv: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Worker":
        env = {**(os.environ if self.env is None else self.env), **CPU_MEMORY_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, *self.argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO_ROOT, bufsize=1)
        return self

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        self.send(cmd, **args)
        return self.receive(cmd)

    def send(self, cmd: str, **args: Any) -> None:
        """Ask without waiting: send to several workers, then `receive` from each, and they work
        at the same time (start-up, imports, CUDA initialisation)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()

    def receive(self, cmd: str) -> dict[str, Any]:
        """The reply to the last `send`; RuntimeError with the child's traceback if it failed."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                reply = json.loads(line[len(_REPLY):])
                if "error" in reply:
                    raise RuntimeError(f"worker {self.argv} failed on {cmd!r}:\n{reply['error']}")
                return reply
            sys.stderr.write(line)
        raise RuntimeError(f"worker {self.argv} exited (status {self.proc.wait()}) before answering {cmd!r}")

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.call("exit")
        except (RuntimeError, BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def error_line(text: str) -> str:
    """The line that names an exception in a traceback or log (its last `XError: ...` /
    `error: ...` line), else the last line: one line for a table or a verdict."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^(error: |[\w.]*(Error|Exception|Interrupt)\b)", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def serve(handlers: dict[str, Callable[..., dict[str, Any]]]) -> int:
    """Child side of `Worker`: answer JSON commands until `exit` (or stdin closes)."""
    import traceback

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request["cmd"] == "exit":
            print(_REPLY + json.dumps({"ok": True}), flush=True)
            return 0
        try:
            reply = handlers[request["cmd"]](**request.get("args", {}))
        except Exception:  # the parent re-raises it with the child's traceback
            reply = {"error": traceback.format_exc()}
        print(_REPLY + json.dumps(reply, default=str), flush=True)
    return 0


# ----------------------------------------------------------------------------- training presets

# The original's batch: per_device_train_batch_size 1 x gradient_accumulation_steps 8 = 8 groups
# (queries) per optimizer step on each rank.
ORIGINAL_GROUPS_PER_STEP = 8


@dataclass(frozen=True)
class TrainPreset:
    """One model shape + data + schedule shared by both sides of a training benchmark.

    `model`: HF LlamaConfig fields. `tokenizer_vocab`: size asked of the byte-level BPE trained on
    the benchmark data (fastalign.tiny.build_tokenizer; no network, so no pretrained tokenizer);
    the model's vocab_size is larger so that the LM head has the target shape: the unused rows
    cost the same FLOPs and memory as used ones.
    `max_tokens_per_batch`: fastalign's micro-batch token budget (several groups per micro-batch);
    the baseline always runs one group per micro-batch, as the original did.
    """

    name: str
    device: str  # "cpu" | "cuda"
    model: dict[str, Any]
    tokenizer_vocab: int
    model_max_length: int = 480
    num_comp: int = 3
    groups_per_step: int = ORIGINAL_GROUPS_PER_STEP
    max_tokens_per_batch: int = 4096
    precision: str = "fp32"  # "fp32" | "bf16" (fp32 master weights, bf16 compute)
    warmup_steps: int = 1
    measure_steps: int = 4
    min_response_chars: int = 0  # > 0: lengthen the data's responses (see lengthened_records)
    realignment_queries: bool = False  # queries quote an earlier answer and feedback (realignment_records)
    note: str = ""


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=1)  # the ids fastalign.tiny.build_tokenizer gives <s> and </s>


TRAIN_PRESETS: dict[str, TrainPreset] = {p.name: p for p in (
    TrainPreset("cpu-smoke", "cpu", _llama(64, 176, 2, 4, 4, 1024), tokenizer_vocab=512, model_max_length=128,
                groups_per_step=2, max_tokens_per_batch=1024, warmup_steps=1, measure_steps=2,
                note="seconds-long smoke run for tests; numbers mean nothing"),
    TrainPreset("cpu-tiny", "cpu", _llama(256, 688, 4, 4, 4, 32000), tokenizer_vocab=8000, model_max_length=480,
                max_tokens_per_batch=4096, warmup_steps=1, measure_steps=8,
                note="the CPU target: 4 layers, hidden 256, vocab 32000, k=3, bundled data"),
    TrainPreset("cpu-tiny-long", "cpu", _llama(256, 688, 4, 4, 4, 32000), tokenizer_vocab=8000,
                model_max_length=480, max_tokens_per_batch=4096, warmup_steps=1, measure_steps=4,
                min_response_chars=1600,
                note="cpu-tiny on the bundled records with responses lengthened to >= 1600 characters "
                     "(about 400 tokens): the regime of the original's model_max_length 480"),
    TrainPreset("cpu-tiny-realign", "cpu", _llama(256, 688, 4, 4, 4, 32000), tokenizer_vocab=8000,
                model_max_length=480, num_comp=5, max_tokens_per_batch=4096, warmup_steps=1, measure_steps=6,
                realignment_queries=True,
                note="cpu-tiny on realignment-like records (realignment_records: each query quotes an earlier "
                     "answer and a reviewer's feedback, so it is most of each sequence), k <= 5"),
    # GPU presets: the trainer's CUDA default budget (train.step_token_budget: the original's
    # padded micro-batch, per_device_train_batch_size 1 x num_comp x model_max_length).
    TrainPreset("gpu-1b", "cuda", _llama(2048, 5632, 22, 32, 4, 32000), tokenizer_vocab=8000, model_max_length=480,
                max_tokens_per_batch=1 * 3 * 480, precision="bf16", warmup_steps=2, measure_steps=8,
                note="TinyLlama-1.1B shape (22 layers, hidden 2048, GQA 32/4), seq 480, bf16"),
    TrainPreset("gpu-1b-realign", "cuda", _llama(2048, 5632, 22, 32, 4, 32000), tokenizer_vocab=8000,
                model_max_length=480, num_comp=5, max_tokens_per_batch=1 * 5 * 480, precision="bf16", warmup_steps=2,
                measure_steps=4, realignment_queries=True,
                note="gpu-1b on cpu-tiny-realign's records (long queries quoting an earlier answer and feedback), "
                     "k <= 5, seq 480, bf16"),
    TrainPreset("gpu-7b-layers", "cuda", _llama(4096, 11008, 4, 32, 32, 32000), tokenizer_vocab=8000,
                model_max_length=480, max_tokens_per_batch=1 * 3 * 480, precision="bf16", warmup_steps=2,
                measure_steps=8, note="Llama-7B layer and head shapes, 4 of its 32 layers (fits one GPU per side)"),
)}


def lengthened_records(src: Path, dst: Path, min_chars: int) -> Path:
    """A copy of a Sandbox file whose responses are at least `min_chars` long: each response is
    followed by the responses of the next records, in file order, until it is long enough
    (deterministic; queries and ratings unchanged). For measuring long-sequence behaviour with
    the bundled data's words."""
    from fastalign.data import load_records

    records = load_records(str(src)).records
    pool = [r for record in records for r in record.responses]
    with open(dst, "w") as out:
        position = 0
        for record in records:
            responses = []
            for response in record.responses:
                while len(response) < min_chars:
                    response += "\n\n" + pool[position % len(pool)]
                    position += 1
                responses.append(response)
            out.write(json.dumps({"query": record.query, "responses": responses, "scores": record.scores}) + "\n")
    return Path(dst)


def realignment_records(src: Path, dst: Path) -> Path:
    """A copy of a Sandbox file shaped like realignment data, whose queries carry an earlier answer
    and feedback on it: record i's query becomes its instruction, then its first response as the
    earlier answer, then feedback quoting its best-rated response; the responses are record i's and
    the next record's, up to 5 (deterministic; ratings carried with their responses)."""
    from fastalign.data import load_records

    records = load_records(str(src)).records
    with open(dst, "w") as out:
        for i, record in enumerate(records):
            neighbour = records[(i + 1) % len(records)]
            instruction = record.query.removesuffix("### Response:").rstrip()
            best = max(range(len(record.responses)), key=lambda j: record.scores[j])
            query = (f"{instruction}\n\n### Earlier answer:\n{record.responses[0]}\n\n### Feedback:\n"
                     f"A reviewer rated it {record.scores[0]:g} of 7 and wrote: a better answer would say "
                     f"\"{record.responses[best]}\" Revise the earlier answer accordingly.\n\n### Response:")
            responses = (record.responses + neighbour.responses)[:5]
            scores = (record.scores + neighbour.scores)[:5]
            out.write(json.dumps({"query": query, "responses": responses, "scores": scores}) + "\n")
    return Path(dst)


def build_llama_checkpoint(out_dir: Path, model_fields: dict[str, Any], *, seed: int = 0,
                           save_dtype: str = "float32", init_device: str = "cpu") -> Path:
    """A randomly initialised HF LlamaForCausalLM saved as safetensors in `out_dir` (the one set of
    weights both sides of a benchmark load)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**model_fields)
    with torch.device(init_device):
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, save_dtype)).save_pretrained(out_dir)
    return Path(out_dir)
