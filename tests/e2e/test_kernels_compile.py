"""Compile every Triton kernel of fastalign/kernels/ for real GPUs, on this CPU-only machine.

The loss tests run the kernels under TRITON_INTERPRET=1, which never compiles them: type
promotion, layout / broadcasting, constexpr and block-size errors only show in the compiler. Here
Triton's full pipeline (ttir -> ttgir -> llir -> ptx -> cubin, with the ptxas its wheel ships) runs
for sm_90 (H100) and sm_80 (A100), with the constexprs and num_warps the launchers pass
(fastalign.kernels.alignment_head.*_config) and each logits dtype. No CUDA driver is needed.

conftest.py sets TRITON_INTERPRET for the whole pytest process, so the compiling happens in a
subprocess without it: this file run as a script (`python tests/e2e/test_kernels_compile.py`) compiles
all cases and prints one JSON line per case (registers, stack bytes, shared memory, or the error).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.slow

ARCHS = {"sm90": 90, "sm80": 80}
LOGIT_DTYPES = ("fp32", "bf16", "fp16")  # the logits slice is in the LM head's dtype
# Integer launch arguments (token counts, slice widths, strides) are multiples of 16 or not;
# Triton specializes on that (tt.divisibility), so both variants are separate binaries.
INT_ALIGNMENTS = ("div16", "odd")
GROUP_SIZES = (2, 8, 1000)  # largest group in the call -> BLOCK_K 2, 8, 1024
MAX_SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024}  # per block, opt-in maximum


def case_names() -> list[str]:
    """Every (kernel, variant, arch) compiled; plain data, so pytest can list it without triton."""
    variants = []
    for dtype in LOGIT_DTYPES:
        for ints in INT_ALIGNMENTS:
            variants += [f"lse_slice-{dtype}-{ints}", f"softmax_grad_slice-{dtype}-{ints}"]
    variants += ["response_mean"]  # pointers only: no integer argument to specialize
    variants += [f"group-k{size}-{mode}{'-maxflow' if max_flow else ''}"
                 for size in GROUP_SIZES for mode in ("paper", "seed")
                 for max_flow in (False, True)]
    return [f"{variant}-{arch}" for arch in ARCHS for variant in variants]


# ----------------------------------------------------------------------------- subprocess side


def _build_case(name: str):
    """-> (kernel, runtime argument types, launch config, ints divisible by 16, arch)."""
    from fastalign.kernels import alignment_head as ah
    from fastalign.kernels.group_math import GroupOptions

    parts = name.split("-")
    kernel, arch = parts[0], ARCHS[parts[-1]]
    if kernel == "lse_slice":
        dtype, ints = parts[1], parts[2]
        types = dict(logits_ptr=f"*{dtype}", stride_row="i32", n_rows="i32", n_cols="i32",
                     target_ptr="*i64", col0="i32", run_max_ptr="*fp32", run_sum_ptr="*fp32",
                     target_logit_ptr="*fp32")
        return ah._lse_slice_kernel, types, ah.lse_slice_config(), ints == "div16", arch
    if kernel == "softmax_grad_slice":
        import torch

        dtype, ints = parts[1], parts[2]
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        types = dict(logits_ptr=f"*{dtype}", stride_row="i32", n_rows="i32", n_cols="i32",
                     lse_ptr="*fp32", target_ptr="*i64", weight_ptr="*fp32", col0="i32")
        return (ah._softmax_grad_slice_kernel, types, ah.softmax_grad_slice_config(torch_dtype),
                ints == "div16", arch)
    if kernel == "response_mean":
        types = dict(value_ptr="*fp32", response_ptr="*i64", out_ptr="*fp32")
        return ah._response_mean_kernel, types, ah.response_mean_config(), False, arch
    if kernel == "group":
        opts = GroupOptions(margin_mode=parts[2], max_flow="maxflow" in parts)
        types = dict(slot_ptr="*i64", max_size="i32", nll_ptr="*fp32", score_ptr="*fp32",
                     loss_ptr="*fp32", penalty_ptr="*fp32", best_ptr="*i64", dloss_ptr="*fp32",
                     dpenalty_ptr="*fp32", inv_groups="fp32", rating_scale="fp32", margin="fp32",
                     ratio="fp32")
        return ah._group_kernel, types, ah.group_config(int(parts[1][1:]), opts), False, arch
    raise ValueError(f"unknown case {name}")


def _compile_case(name: str, resource_usage) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, types, config, ints_div16, arch = _build_case(name)
    constexprs = {k: v for k, v in config.items() if k in fn.arg_names}
    options = {k: v for k, v in config.items() if k not in fn.arg_names}
    # The launcher's arguments must be exactly the kernel's: a drifted test compiles nothing real.
    assert set(types) | set(constexprs) == set(fn.arg_names), (
        f"{name}: the test's argument types {sorted(types)} + constexprs {sorted(constexprs)} "
        f"do not match {fn.__name__}{tuple(fn.arg_names)}")
    signature = {arg: types.get(arg, "constexpr") for arg in fn.arg_names}
    # Like a launch with torch tensors (16-byte aligned) and, for div16, int arguments % 16 == 0.
    divisible = [arg for arg, ty in types.items()
                 if ty.startswith("*") or (ints_div16 and ty.startswith("i"))]
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in divisible}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # reported per case; the test prints the compiler's message
        return dict(case=name, ok=False, error=f"{type(err).__name__}: {err}"[-4000:])
    cubin = compiled.asm.get("cubin", b"")
    ptx = compiled.asm.get("ptx", "")
    return dict(case=name, ok=True, seconds=round(time.perf_counter() - start, 2),
                ptx_bytes=len(ptx), ptx_nan_max=ptx.count("max.NaN.f32"),
                cubin_is_elf=cubin[:4] == b"\x7fELF", shared=compiled.metadata.shared,
                num_warps=compiled.metadata.num_warps, **resource_usage(cubin))


def _resource_usage_reader():
    """cubin bytes -> {"regs", "stack"} from the wheel's cuobjdump (CompiledKernel.n_regs /
    n_spills are only filled when a driver loads the binary). Stack bytes > 0 means spills."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def read(cubin: bytes) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
        found = re.search(r"REG:(\d+) STACK:(\d+)", out.stdout)
        if not found:
            return dict(regs=None, stack=None, usage_error=(out.stdout + out.stderr)[-500:])
        return dict(regs=int(found[1]), stack=int(found[2]))

    return read


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    reader = _resource_usage_reader()
    for name in sys.argv[1:] or case_names():
        print(json.dumps(_compile_case(name, reader)), flush=True)
    return 0


# ----------------------------------------------------------------------------- pytest side


def _skip_unless_ptxas_runs():
    """The one reason to skip: no ptxas that runs here (Triton's wheel ships it for x86-64 and
    aarch64 Linux; sm_80 uses `ptxas`, sm_90 `ptxas-blackwell`)."""
    triton = pytest.importorskip("triton")
    for tool in (triton.knobs.nvidia.ptxas, triton.knobs.nvidia.ptxas_blackwell):
        try:
            subprocess.run([tool.path, "--version"], check=True, capture_output=True, timeout=60)
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            pytest.skip(f"Triton's ptxas cannot run on this machine ({err}); kernels not compiled")


@pytest.fixture(scope="module")
def compiled_cases(tmp_path_factory) -> dict[str, dict]:
    _skip_unless_ptxas_runs()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # compile, not a hit
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    # One compiling process per core (each case is compiled alone, so splitting changes nothing
    # but the wall time).
    cases = case_names()
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *cases[i::workers]], env=env, cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(workers)]
    results = {}
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"compile subprocess failed:\n{stdout}\n{stderr[-6000:]}"
            for line in stdout.splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    results[row["case"]] = row
    finally:
        for proc in procs:  # a failed or timed-out one leaves no compiler running
            proc.kill()
            proc.wait()
    print("\nkernel compile results (regs / stack bytes / shared bytes / seconds):")
    for row in results.values():
        if row["ok"]:
            print(f"  {row['case']:<40} regs {row['regs']:>3}  stack {row['stack']:>5}  "
                  f"shared {row['shared']:>6}  {row['seconds']:.2f}s")
        else:
            print(f"  {row['case']:<40} FAILED")
    return results


@pytest.mark.parametrize("case", case_names())
def test_kernel_compiles_to_cubin_without_spills(compiled_cases, case):
    row = compiled_cases.get(case)
    assert row is not None, f"{case}: the compile subprocess printed no result"
    assert row["ok"], f"{case} does not compile:\n{row['error']}"
    assert row["ptx_bytes"] > 0 and row["cubin_is_elf"], f"{case}: no PTX / cubin ELF produced"
    assert row["regs"] is not None, f"{case}: cuobjdump read no usage: {row['usage_error']}"
    arch = ARCHS[case.rsplit("-", 1)[1]]
    assert row["shared"] <= MAX_SHARED_BYTES[arch], (
        f"{case}: {row['shared']} bytes of shared memory, more than sm_{arch} offers")
    # Spills go to local memory (stack) and would make these memory-bound kernels slower still.
    assert row["stack"] == 0, f"{case}: {row['regs']} registers, {row['stack']} B stack (spills)"
    if case.startswith("group-"):
        # penalty = max(aggregate, 0) must keep a NaN (PTX max.NaN.f32): plain max.f32 returns
        # the non-NaN operand, i.e. penalty 0 and a finite loss from a NaN nll.
        assert row["ptx_nan_max"] > 0, f"{case}: no NaN-propagating max in the group kernel's PTX"


if __name__ == "__main__":
    sys.exit(main())
