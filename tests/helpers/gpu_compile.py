"""Compile every Triton kernel of llmopt/kernels/ for an NVIDIA sm_90 target (H100, H200), without a GPU.

The CPU tests run the kernels under Triton's interpreter, which executes them as Python and so accepts code that
Triton's compiler refuses; this compiles each kernel, for each dtype and each kind of launch the code makes, as
far as the GPU's machine code (PTX and cubin, through the ptxas that ships with Triton). It must run without
TRITON_INTERPRET (tests/kernels/test_kernels.py starts it in a subprocess): `python -m tests.helpers.gpu_compile`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys

# per kernel: its pointer arguments' types ("*D": the kernel's DTYPE) and the constexpr variants the code launches
# (M_DTYPE, the EMA momentum's dtype: "fp32" or "DTYPE")
SPECS = {
    "_row_update_kernel": (
        {"p_addrs": "*i64", "d_addrs": "*i64", "g_addrs": "*i64"},
        [dict(ROWS=1, BLOCK=2048, DECAY=True, MOMENTUM=True, ALIGNED=True),
         dict(ROWS=8, BLOCK=256, DECAY=False, MOMENTUM=False, ALIGNED=True),
         dict(ROWS=1, BLOCK=8192, DECAY=True, MOMENTUM=False, ALIGNED=False)]),
    "_column_update_kernel": ({"p": "*D", "d": "*D", "rms": "*D"}, [dict(BLOCK=1024, DECAY=True)]),
    "_lerp_sumsq_kernel": ({"m_addrs": "*i64", "g_addrs": "*i64", "partials": "*fp32"},
                           [dict(BLOCK=512, ALIGNED=True)]),
    "_segment_sum_kernel": ({"partials": "*fp32", "first_block": "*i64", "blocks_of": "*i32", "out": "*fp32"},
                            [dict(BLOCK=1024)]),
    "_scaled_sub_kernel": ({"p_addrs": "*i64", "u_addrs": "*i64", "factors": "*fp32", "list_index": "*i32"},
                           [dict(BLOCK=512, ALIGNED=True)]),
    "_row_scaled_sub_kernel": ({"p": "*D", "u": "*D", "factor": "*fp32", "row_factors": "*D"},
                               [dict(ROWS=1, BLOCK=2048)]),
    "_row_lerp_sumsq_kernel": ({"m_addrs": "*i64", "g_addrs": "*i64", "row_sq": "*fp32"},
                               [dict(ROWS=1, BLOCK=2048, ALIGNED=True)]),
    "_ema_momentum_kernel": ({"m_addrs": "*i64", "prev_addrs": "*i64", "p_addrs": "*i64"},
                             [dict(BLOCK=1024, ALIGNED=True, M_DTYPE="fp32"),
                              dict(BLOCK=1024, ALIGNED=False, M_DTYPE="fp32"),
                              dict(BLOCK=1024, ALIGNED=True, M_DTYPE="DTYPE")]),
    "_muon_stack_kernel": ({"m_addrs": "*i64", "g_addrs": "*i64", "stack": "*bf16", "partials": "*fp32"},
                           [dict(NESTEROV=True, BLOCK=1024, ALIGNED=True), dict(NESTEROV=False, BLOCK=1024,
                                                                                 ALIGNED=False)]),
    "_divide_stack_kernel": ({"stack": "*bf16", "divisors": "*fp32"}, [dict(BLOCK=1024)]),
}
FLOAT_SCALARS = {"lr", "decay", "sqrt_cols", "weight", "gamma", "momentum"}  # the other scalars are integers


def compile_all() -> list[str]:
    """Compile every kernel variant; returns a line per variant, "NAME DTYPE VARIANT LOADS: ok", LOADS the widest
    load of the machine code ("vector" or "scalar"; the launches' specialization assumed: pointers and integers
    multiples of 16, as for a 2048-wide weight). Raises on the first kernel that fails."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import llmopt.kernels

    # every module of the package, so that a new family's kernels cannot be missed
    modules = [importlib.import_module(f"llmopt.kernels.{module.name}")
               for module in pkgutil.iter_modules(llmopt.kernels.__path__)]
    kernels = {name: fn for module in modules for name, fn in vars(module).items()
               if name.startswith("_") and name.endswith("_kernel")}
    if sorted(SPECS) != sorted(kernels):
        raise SystemExit(f"tests/helpers/gpu_compile.py: SPECS must name every kernel; llmopt/kernels/ has "
                         f"{sorted(kernels)}, "
                         f"SPECS {sorted(SPECS)}: add the new kernel's pointer types and launch variants")
    lines = []
    for name, (pointers, variants) in SPECS.items():
        fn = kernels[name]
        names = [p.name for p in fn.params]
        constexprs = {p.name for p in fn.params if p.is_constexpr}
        for dtype_name, dtype in (("bf16", tl.bfloat16), ("fp32", tl.float32)):
            if "DTYPE" not in constexprs and dtype_name == "fp32":
                continue  # no DTYPE: one compile
            for variant in variants:
                values = {**variant, "DTYPE": dtype} if "DTYPE" in constexprs else dict(variant)
                if "M_DTYPE" in values:  # a second dtype (the EMA momentum): fp32, or the kernel's DTYPE
                    values["M_DTYPE"] = {"fp32": tl.float32, "DTYPE": dtype}[values["M_DTYPE"]]
                signature = {}
                for n in names:
                    if n in constexprs:
                        signature[n] = "constexpr"
                    elif n in pointers:
                        signature[n] = pointers[n].replace("D", dtype_name)
                    else:
                        signature[n] = "fp32" if n in FLOAT_SCALARS else "i32"
                source = ASTSource(fn=fn, signature=signature,
                                   constexprs={(names.index(n),): v for n, v in values.items()},
                                   attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names
                                          if signature[n] != "constexpr" and n not in FLOAT_SCALARS})
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
                assert compiled.asm.get("cubin"), f"{name}: no cubin"
                # a data load: of bf16/fp32 elements (the address tables' loads are of single int64 values)
                vector = re.search(r"ld\.global(\.\w+)*\.v[24]\.b32", compiled.asm["ptx"])
                lines.append(f"{name} {dtype_name} {variant} {'vector' if vector else 'scalar'}: ok")
    return lines


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("tests/helpers/gpu_compile.py compiles for the GPU: run it without TRITON_INTERPRET=1")
    print("\n".join(compile_all()))
    sys.exit(0)
