"""Compiles the channels-last kernels exactly as the JIT would for timm's DPN92 forward (fp16,
224x224 images, batch 1 and 64) and inspects the PTX: prints one JSON object per distinct
specialisation and arch.

The launches come from the torch host's own plan (dpn_fast.engines.torch_host._Plan on CPU
tensors: planned, not run); each is specialised by Triton's own binder for the target (the
divisibility and alignment attributes the JIT derives from the arguments, the constexprs, the
options), then compiled ahead of time: no GPU needed. Uses Triton internals
(create_function_from_signature, JITFunction._pack_args): a Triton upgrade that changes them
fails here loudly rather than checking something else.

Run as a separate process (tests/test_gpu_compile.py does): TRITON_INTERPRET must be unset when
triton is imported.

    python tests/_triton_ptx.py --archs 80,90
"""
import argparse
import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from _triton_aot import print_row, ptxas_for, resource_usage  # noqa: E402  (this script runs from tests/)
from test_gpu_compile import problems, ptx_findings  # noqa: E402

def jit_compile(launch, cc):
    """triton.compile of a planned Launch with the specialisation the JIT derives from its
    arguments on a device of compute capability cc."""
    kernel, target = launch.kernel, GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.options)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.options, bound,
                                                              specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__), signature, attrs


def dpn92_launches(cc, batches):
    """{specialisation key: (label, launch)}: the distinct launches of DPN92's fused fp16 forward
    at 224x224 for the given batch sizes, planned for compute capability cc."""
    from dpn_fast.engines.torch_host import _Plan, fuse, import_timm
    torch.manual_seed(0)
    model = import_timm().create_model("dpn92", pretrained=False).eval().half()
    fused = fuse(model)
    distinct = {}
    for n in batches:
        plan = _Plan(fused, n, 56, 56, cc)
        for i, launch in enumerate(plan.launches):
            key = (launch.kernel.fn.__name__, json.dumps(launch.options, sort_keys=True),
                   tuple(a.data_ptr() % 16 == 0 for a in launch.args if hasattr(a, "data_ptr")))
            distinct.setdefault(key, (f"n={n} launch {i}", launch))
    return distinct


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default="80,90")
    parser.add_argument("--batches", default="1,64")
    args = parser.parse_args()
    batches = [int(n) for n in args.batches.split(",")]
    for cc in (int(a) for a in args.archs.split(",")):
        for (name, options, _), (label, launch) in dpn92_launches(cc, batches).items():
            row = {"kernel": name, "cc": cc, "first_use": label, "options": json.loads(options)}

            def check(launch=launch, cc=cc):
                compiled, signature, attrs = jit_compile(launch, cc)
                ptx = compiled.asm["ptx"]
                usage = resource_usage(ptx, ptxas_for(cc))
                findings = ptx_findings(ptx)
                return dict(signature=signature, attrs={str(k): v for k, v in attrs.items()},
                            **findings, usage=usage, problems=problems(findings, usage))
            print_row(row, check)


if __name__ == "__main__":
    main()
