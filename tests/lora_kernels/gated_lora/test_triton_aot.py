"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90 (no GPU needed: triton.compile + ptxas).

The interpreter runs kernels as numpy and tolerates what the GPU compiler rejects (dtype mismatches in
tl.dot, bad atomics, shared-memory overflow of the real tile config); this compiles each kernel's
representative constexpr/dtype variants (``KernelSpec.variants``). TRITON_INTERPRET=1 reroutes
``triton.jit`` to the interpreter, so each target compiles in a subprocess with it unset, both at once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_SCRIPT = r"""
import json, sys, time
import torch, triton
from triton.backends.compiler import GPUTarget
from lora_kernels.gated_lora import triton as tg
cap = int(sys.argv[1])
done, failed, t0 = [], [], time.time()
for spec in tg.KERNELS:
    for variant, dtype, options in spec.variants:
        ce = spec.constexprs(variant, dtype)
        label = f"{spec.fn.__name__}[{dtype}, {variant}]"
        try:
            src = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature(dtype, ce), constexprs=ce)
            k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(options))
            assert k.asm.get("cubin"), "no cubin produced"
            done.append(label)
        except Exception as e:
            failed.append(f"{label}: {type(e).__name__}: {str(e)[-2000:]}")
print(json.dumps({"done": done, "failed": failed, "seconds": time.time() - t0}))
"""


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except (ImportError, AttributeError, RuntimeError, OSError):  # knobs raise when the binary is missing
        return False


def test_aot_compile_every_kernel_for_sm80_and_sm90():
    pytest.importorskip("triton", reason="triton is not importable")
    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas is missing: cannot produce cubins")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = {cap: subprocess.Popen([sys.executable, "-c", _SCRIPT, str(cap)], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cap in (80, 90)}
    from lora_kernels.gated_lora import triton as tg
    expected = sum(len(s.variants) for s in tg.KERNELS)
    for cap, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{cap} compile script crashed:\n{err[-4000:]}"
        res = json.loads(out.strip().splitlines()[-1])
        assert not res["failed"], f"sm_{cap}: " + "\n".join(res["failed"])
        assert len(res["done"]) == expected
        print(f"sm_{cap}: compiled {len(res['done'])} kernel variants in {res['seconds']:.1f}s")
