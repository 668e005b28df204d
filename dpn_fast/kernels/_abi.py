"""ctypes binding of the C ABI of the ahead-of-time kernels (csrc/aot_kernels.h) in a CUDA build
of the op library (libdpn_fast_ops.so, with Paddle) or of the Paddle-free libdpn_fast_kernels.so.
Framework-free: the caller gives the library's path and passes tensors that have data_ptr().
"""
import ctypes
from typing import NamedTuple



class AotKernelError(RuntimeError):
    """A status other than OK from the ABI; `status` is its code, the message the library's."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class NoCudaDriverError(AotKernelError):
    pass


class NoCubinForArchError(AotKernelError):
    pass


class UnknownKernelError(AotKernelError):
    pass


class LaunchArgumentsError(AotKernelError):
    pass


# csrc/aot_kernels.h's DpnFastAotStatus
ERRORS = {1: NoCudaDriverError, 2: AotKernelError, 3: NoCubinForArchError, 4: UnknownKernelError,
          5: LaunchArgumentsError, 6: AotKernelError}


class _Info(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_char_p),
                ("variant", ctypes.c_char_p), ("arch", ctypes.c_int),
                ("num_warps", ctypes.c_int), ("shared_bytes", ctypes.c_int),
                ("params", ctypes.c_char_p), ("num_params", ctypes.c_int),
                ("hidden_params", ctypes.c_int), ("image", ctypes.c_void_p),
                ("image_size", ctypes.c_size_t)]


class EmbeddedKernel(NamedTuple):
    name: str
    dtype: str
    variant: str
    arch: int
    num_warps: int
    shared_bytes: int
    params: tuple        # Triton types of the launch's arguments ("*fp16", "i32")
    hidden_params: int   # Triton's scratch pointers the ABI appends
    cubin: bytes


class EmbeddedKernels:
    """The kernels a CUDA build of `library` embeds: len(), [index] -> EmbeddedKernel, and
    launch(). Raises OSError when the library lacks the ABI (a CPU-only build)."""

    def __init__(self, library):
        self._lib = ctypes.CDLL(str(library))
        if not hasattr(self._lib, "dpn_fast_aot_count"):
            raise OSError(f"{library} has no ahead-of-time kernels (a CPU-only build)")
        self._lib.dpn_fast_aot_count.restype = ctypes.c_int
        self._lib.dpn_fast_aot_describe.argtypes = [ctypes.c_int, ctypes.POINTER(_Info)]
        self._lib.dpn_fast_aot_launch.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
        self._lib.dpn_fast_aot_last_error.restype = ctypes.c_char_p
        self._params = None  # (name, dtype, variant) -> params, read on first launch

    def _check(self, status):
        if status:
            raise ERRORS.get(status, AotKernelError)(
                status, self._lib.dpn_fast_aot_last_error().decode())

    def __len__(self):
        return self._lib.dpn_fast_aot_count()

    def _describe(self, index):
        info = _Info()
        self._check(self._lib.dpn_fast_aot_describe(index, ctypes.byref(info)))
        return info

    def __getitem__(self, index):
        info = self._describe(index)
        return EmbeddedKernel(info.name.decode(), info.dtype.decode(), info.variant.decode(),
                              info.arch, info.num_warps, info.shared_bytes,
                              tuple(info.params.decode().split(",")), info.hidden_params,
                              ctypes.string_at(info.image, info.image_size))

    def params(self, name, dtype, variant):
        """The Triton types of the arguments of a kernel variant (the same for every arch), or
        None when the library has no such variant."""
        if self._params is None:
            self._params = {}
            for index in range(len(self)):
                info = self._describe(index)
                self._params[(info.name.decode(), info.dtype.decode(), info.variant.decode())] = \
                    tuple(info.params.decode().split(","))
        return self._params.get((name, dtype, variant))

    def launch(self, name, dtype, variant, grid, stream, args):
        """Launches kernel `name` (its function name) for activations of `dtype` in `variant`
        (dpn_fast.kernels._launch.variant_key) with `grid` (1 to 3 ints) on `stream` (a CUstream
        handle as an int; 0: the default stream). args: the kernel's arguments in order, tensors
        (data_ptr()) or device addresses as ints for "*" params, ints for "i32"."""
        kinds = self.params(name, dtype, variant)
        values = []
        if kinds is not None and len(kinds) == len(args):  # else the library reports why
            for i, (kind, arg) in enumerate(zip(kinds, args)):
                value = arg.data_ptr() if hasattr(arg, "data_ptr") else arg
                if kind.startswith("*") and isinstance(value, int) and value >= 0:
                    values.append(ctypes.c_uint64(value))
                elif kind == "i32" and isinstance(value, int) and -2**31 <= value < 2**31:
                    values.append(ctypes.c_int32(value))
                else:
                    raise TypeError(f"{name}: argument {i} must be "
                                    + ("a tensor or a device address" if kind.startswith("*")
                                       else "an int32") + f", got {arg!r}")
        else:
            values = [ctypes.c_uint64(0)] * len(args)
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        dims = (ctypes.c_uint * 3)(*(tuple(grid) + (1, 1, 1))[:3])
        self._check(self._lib.dpn_fast_aot_launch(
            name.encode(), dtype.encode(), variant.encode(), dims, ctypes.c_void_p(stream),
            len(values), pointers))

    def launch_planned(self, launch, stream):
        """Runs a planned Launch (dpn_fast.kernels._launch), its Regions bound to tensors or
        device addresses, through the ABI: its kernel in its variant and dtype."""
        if launch.kernel is not None:
            self.launch(launch.kernel.fn.__name__, launch.dtype, launch.variant, launch.grid,
                        stream, launch.args)
