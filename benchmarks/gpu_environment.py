"""gpu_check's first stage: what this machine has, and whether the later stages can run at all.

Facts (all written to environment.json, in every case): GPU, driver, torch / CUDA / triton /
transformers / flash-attn versions; the C compiler and Python headers Triton needs to build the
small C launcher it compiles on its first kernel launch (path and version); the result of
launching one tiny Triton kernel; the attention and loss backends fastalign picks here and why.

Verdict: `fatal` when no later stage can work (no CUDA; Triton cannot build its launcher): the
check stops there with one line naming the cause and the fix. `problems` when the stages can run
but the result is already known to be wrong (on sm80 or newer, attention falling back to
per-sequence SDPA: slow and otherwise silent).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.lib.machine import machine_info

# The head_dim of Llama-7B and of the 1B preset's GQA layout: what the attention must serve.
PROBE_HEAD_DIM = 128


@dataclass
class Verdict:
    fatal: str = ""  # why no later stage can run, with the fix ("" when they can)
    problems: list[str] = field(default_factory=list)  # wrong but not blocking: the stage fails


# ----------------------------------------------------------------------------- build tools


def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def c_compiler() -> dict[str, Any]:
    """The compiler Triton's launcher build would use: $CC, else cc / gcc / clang on PATH (the
    order of triton.runtime.build)."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return {"path": path, "version": _first_line([path, "--version"])}
    return {"path": None, "version": None, "looked_for": candidates}


def python_headers() -> dict[str, Any]:
    """Python.h where the launcher build includes it from (sysconfig's include dirs)."""
    dirs = [d for d in dict.fromkeys((sysconfig.get_paths().get("include"), sysconfig.get_paths().get("platinclude")))
            if d]
    for directory in dirs:
        header = Path(directory) / "Python.h"
        if header.is_file():
            patchlevel = Path(directory) / "patchlevel.h"
            version = None
            if patchlevel.is_file():
                match = re.search(r'#define\s+PY_VERSION\s+"([^"]+)"', patchlevel.read_text(errors="replace"))
                version = match.group(1) if match else None
            return {"path": str(header), "version": version}
    return {"path": None, "version": None, "looked_in": dirs}


# ----------------------------------------------------------------------------- Triton launch


def triton_launch() -> dict[str, Any]:
    """Launch one tiny Triton kernel on the GPU (the first launch builds the C launcher).
    {"ok": True, "seconds": ...} or {"ok": False, "error": first line of what went wrong}."""
    try:
        import torch

        from benchmarks.triton_probe import add_one
    except Exception as err:  # a broken install raises more than ImportError
        return {"ok": False, "error": f"triton does not import: {type(err).__name__}: {_one_line(err)}"}
    start = time.perf_counter()
    try:
        got = add_one(torch.zeros(5, device="cuda")).tolist()
    except Exception as err:
        return {"ok": False, "error": f"{type(err).__name__}: {_one_line(err)}"}
    if got != [1.0] * 5:
        return {"ok": False, "error": f"the probe kernel computed {got}, not five ones"}
    return {"ok": True, "seconds": round(time.perf_counter() - start, 2)}


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # A failed launcher build quotes the compiler's output: its `error:` line is the cause.
    cause = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
    return cause[:300]


# ----------------------------------------------------------------------------- fastalign's choices


def fastalign_choices(cuda: bool) -> dict[str, Any]:
    """The backends fastalign runs with here (bf16 on CUDA, head_dim 128) and why each was chosen."""
    import torch

    from fastalign import attention
    from fastalign.alignment_model import loss_backend_name

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    chosen = attention.resolve_backend("auto", device, dtype, head_dim=PROBE_HEAD_DIM)
    passed_over = {b: attention._unavailable_reason(b, device, dtype, PROBE_HEAD_DIM)
                   for b in attention.BACKENDS[:attention.BACKENDS.index(chosen)]}
    attention_reason = "; ".join(f"not {b}: {why}" for b, why in passed_over.items()) or \
        f"{chosen} is the first choice and runs here"
    loss = loss_backend_name("auto", device)
    loss_reason = ("CUDA device: the fused Triton kernels" if loss == "triton"
                   else "no CUDA device: the PyTorch twin of the kernels")
    flash_fn, flash_reason = attention.flash_attn_status()
    choices = {"attention_backend": chosen, "attention_reason": attention_reason,
               "loss_backend": loss, "loss_reason": loss_reason, "flash_attn_usable": flash_fn is not None}
    if flash_reason:
        choices["flash_attn_reason"] = flash_reason
    return choices


# ----------------------------------------------------------------------------- the stage


def collect() -> tuple[dict[str, Any], Verdict]:
    """Every fact of environment.json, and the verdict drawn from them."""
    import torch

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {"cuda_available": cuda, **machine_info("cuda" if cuda else "cpu"),
                            "cuda_build": torch.version.cuda, "c_compiler": c_compiler(),
                            "python_headers": python_headers()}
    try:
        info.update(fastalign_choices(cuda))
    except Exception as err:  # reported, not raised: the facts above are still worth writing
        info["fastalign_choices_error"] = f"{type(err).__name__}: {_one_line(err)}"
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = _first_line([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                          "--format=csv,noheader"])
    if cuda:
        info["triton_launch"] = triton_launch()
    return info, verdict(info)


def verdict(info: dict[str, Any]) -> Verdict:
    """What the facts mean for the later stages (see the module docstring)."""
    found = Verdict()
    if not info["cuda_available"]:
        found.fatal = (f"no CUDA device visible to torch {info['torch']} (CUDA build: {info.get('cuda_build')}); "
                       "fix: run on a machine with an NVIDIA GPU and a CUDA build of torch, and check "
                       "nvidia-smi and CUDA_VISIBLE_DEVICES")
        return found
    launch = info.get("triton_launch") or {"ok": False, "error": "not tried"}
    if not launch["ok"]:
        missing = [what for what, key in (("a C compiler", "c_compiler"), ("Python's headers", "python_headers"))
                   if not info[key]["path"]]
        fix = (f"install {' and '.join(missing)} (e.g. apt-get install gcc python3-dev), or set CC to a compiler"
               if missing else "a C compiler and Python.h were found: see triton_launch and c_compiler in "
               "environment.json")
        found.fatal = f"Triton cannot launch a kernel ({launch['error']}); fix: {fix}"
        return found
    if "fastalign_choices_error" in info:
        found.problems.append(f"fastalign's backend choice failed: {info['fastalign_choices_error']}")
    capability = tuple(int(x) for x in str(info.get("gpu_capability", "0.0")).split("."))
    if capability >= (8, 0) and info.get("attention_backend") == "sdpa":
        found.problems.append(
            f"attention falls back to per-sequence SDPA on sm{capability[0]}{capability[1]} (torch {info['torch']}, "
            f"flash-attn {info.get('flash_attn') or 'none'}): {info.get('attention_reason')}; fix: install "
            "flash-attn built for this torch, or a torch with torch.nn.attention.varlen (2.9 or newer)")
    return found
