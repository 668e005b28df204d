"""A kernel launch planned once: the launchers check their arguments when they plan it, so a
forward planned per input shape (dpn_fast.engines.torch_host) validates once and then only
launches."""

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


class Launch:
    """`kernel[grid](*args, **options)`, its arguments already checked. Tests compile the same
    (kernel, args, options) ahead of time with the JIT's own specialisation. kernel None: a launch
    with nothing to do (no rows)."""
    __slots__ = ("kernel", "grid", "args", "options")

    def __init__(self, kernel, grid, args, options):
        self.kernel, self.grid, self.args, self.options = kernel, grid, args, options

    @property
    def variant(self):
        return variant_key(self.options)

    def __call__(self):
        if self.kernel is not None:
            self.kernel[self.grid](*self.args, **self.options)


NOTHING = Launch(None, None, (), {})
