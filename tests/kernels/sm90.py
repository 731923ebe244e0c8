"""Offline compilation of a Gluon kernel for an H100 (sm_90) with the installed Triton and its
own ptxas, on any machine: a layout conversion a kernel asserts trivial that would move data,
or an API this Triton's Gluon rejects, fails here rather than on the first GPU launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Run in a fresh interpreter: the tests run under TRITON_INTERPRET=1, which turns Triton's
# library functions (gl.max, gl.sum) into interpreter objects Gluon cannot compile.
# ``setup`` defines fn (the kernel), consts (its constexprs), pointers (name: Triton type of
# each pointer and float argument; the rest are i32) and options (num_warps, maxnreg).
_SCRIPT = """
import json
import os
import re
import subprocess
import tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

{setup}
signature = {{n: "constexpr" if n in consts else pointers.get(n, "i32") for n in fn.arg_names}}
k = triton.compile(GluonASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options=options)
with tempfile.TemporaryDirectory() as tmp:
    cubin = os.path.join(tmp, "k.cubin")
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = dict(re.findall(r"(REG|STACK):(\\d+)", subprocess.run([tool, "-res-usage", cubin], capture_output=True,
                                                                 text=True).stdout))
print(json.dumps(dict(mma="mma.sync" in k.asm["ptx"], registers=int(usage["REG"]), stack=int(usage["STACK"]))))
"""


def compile_sm90(setup: str) -> dict:
    """Compile the kernel ``setup`` describes; return ``{mma, registers, stack}``: whether it
    uses the tensor cores, its registers a thread and its stack bytes (spills)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SCRIPT.format(setup=setup)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
