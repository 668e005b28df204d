"""Lets Triton's CPU interpreter (TRITON_INTERPRET=1) run on raw host memory.

The interpreter copies every tensor argument "to the host" through torch's storage API. For
memory that is already on the host (a Paddle or numpy CPU tensor) that copy is the identity, so
`HostTensor` implements just enough of that API over a pointer. Framework-free: the caller
passes the pointer, a dtype string ("float32", "float16", ...) and an owner to keep alive.
"""


class HostTensor:
    def __init__(self, ptr, dtype, owner=None):
        self._ptr = int(ptr)
        self.dtype = dtype  # Triton reads str(dtype); "float32" -> fp32
        self._owner = owner

    def data_ptr(self):
        return self._ptr

    # Storage protocol used by the interpreter; host memory needs no copies.
    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def new_empty(self, *args, **kwargs):
        return HostTensor(0, self.dtype)

    def set_(self, storage, offset, size, stride):
        self._ptr, self._owner = storage.data_ptr(), storage
        return self

    def storage_offset(self):
        return 0

    def size(self):
        return ()

    def stride(self):
        return ()

    def copy_(self, other):
        return self
