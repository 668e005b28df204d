"""A planned DPN stage (dpn_fast/kernels/_stage.py) run by the op library's embedded Triton
kernels on Paddle's stream: the `dpn_fast_aot_stage` op (csrc/aot_stage_gpu.cc), registered by
CUDA builds of the library. `encode_stage` turns a StagePlan into the op's attributes."""
from dpn_fast import _extension
from dpn_fast.kernels._launch import Region

OP = "dpn_fast_aot_stage"
# The op's operands before the weights, by the Region names of a stage plan.
FIXED_OPERANDS = ("input", "stage", "bottleneck", "grouped")


def encode_stage(plan, weight_order):
    """(kernels, launches, sizes): the op's attributes for `plan`, its weights passed in
    `weight_order` (names as in the plan). See csrc/aot_stage_gpu.cc for the encoding."""
    operands = {name: i for i, name in enumerate(FIXED_OPERANDS + tuple(weight_order))}
    reads = dict.fromkeys(weight_order, 0)
    reads["input"] = 0
    kernels, launches = [], []
    for launch in plan.launches:
        if launch.kernel is None:
            continue
        kernels += [launch.kernel.fn.__name__, launch.dtype, launch.variant]
        launches += [*(tuple(launch.grid) + (1, 1))[:3], len(launch.args)]
        for arg in launch.args:
            if isinstance(arg, Region):
                if arg.name not in operands:
                    raise KeyError(f"{OP}: the plan names {arg.name!r}, not among the operands "
                                   f"{sorted(operands)}")
                if arg.name in reads:
                    reads[arg.name] = max(reads[arg.name], arg.size)
                launches += [1, operands[arg.name]]
            else:
                launches += [0, int(arg)]
    sizes = [plan.sizes["stage"] // plan.row_stride, plan.row_stride, plan.sizes["bottleneck"],
             plan.sizes["grouped"], reads["input"], *(reads[name] for name in weight_order)]
    return kernels, launches, sizes


def aot_stage(x, weights, encoded):
    """The stage's output rows [rows, plan.row_stride] for input rows `x` (a CUDA tensor), on the
    embedded kernels: `weights` the plan's weight tensors in the order `encoded` =
    encode_stage(plan, weight_order) was given (encoded once per plan, run at every call)."""
    if not _extension.BUILT_WITH_CUDA:
        raise RuntimeError(f"{OP}: dpn_fast was built without CUDA (no nvcc at install time)")
    return _extension.run_op(OP, x, list(weights), *encoded)[0]
