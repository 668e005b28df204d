"""A kernel launch planned once: the launchers check their arguments when they plan it, so a
forward planned per input shape (dpn_fast.engines.torch_host) validates once and then only
launches."""
from typing import NamedTuple

# Sizes and row strides the kernels index with are hinted as multiples of VECTOR_ALIGN elements
# when they all are (16 bytes at fp16/bf16: one 128-bit load or store, cp.async's widest copy).
VECTOR_ALIGN = 8


def alignment(*values):
    """VECTOR_ALIGN when every value is a multiple of it, else 1: the ALIGN constexpr the
    kernels restate those values with (`x // ALIGN * ALIGN`), which the compiler then knows to
    be multiples of ALIGN."""
    return VECTOR_ALIGN if all(v % VECTOR_ALIGN == 0 for v in values) else 1


def variant_key(options):
    """A launch's options (constexprs, num_warps, num_stages) as one canonical string, e.g.
    "ALIGN=8,BLOCK_C=16,...,num_warps=4": how the op library's ahead-of-time kernels are named
    (dpn_fast/kernels/_embedded.py), so a planned launch finds its cubin by it."""
    return ",".join(f"{name}={int(value) if isinstance(value, bool) else value}"
                    for name, value in sorted(options.items()))


class Region(NamedTuple):
    """A tensor argument as data (a planned stage, dpn_fast/kernels/dpn_stage.py): the start of
    the buffer or weight `name`, of which the launch reads or writes `size` elements of `dtype`.
    Launch.bind turns it into the host's tensor or address."""
    name: str
    dtype: str
    size: int


class Launch:
    """`kernel[grid](*args, **options)`, its arguments already checked, for activations of dtype
    (a dtype name). Tests compile the same (kernel, args, options) ahead of time with the JIT's
    own specialisation. kernel None: a launch with nothing to do (no rows). Its tensor arguments
    may be Regions until bound."""
    __slots__ = ("kernel", "grid", "args", "options", "dtype")

    def __init__(self, kernel, grid, args, options, dtype):
        self.kernel, self.grid, self.args, self.options, self.dtype = kernel, grid, args, \
            options, dtype

    @property
    def variant(self):
        return variant_key(self.options)

    def bind(self, resolve):
        """This launch with each Region argument replaced by resolve(region)."""
        return Launch(self.kernel, self.grid, tuple(
            resolve(a) if isinstance(a, Region) else a for a in self.args), self.options,
            self.dtype)

    def __call__(self):
        if self.kernel is not None:
            self.kernel[self.grid](*self.args, **self.options)


NOTHING = Launch(None, None, (), {}, None)
