"""The tile table of the channels-last kernels (tiles.json, shipped in the package): per kernel,
GPU arch and dtype class, an ordered list of shape classes. Its format is described in the
file's "about"; a GPU sweep rewrites the entries, this module only reads them."""
import json
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("tiles.json")


@lru_cache(maxsize=None)
def _table():
    return json.loads(TABLE.read_text())


def current_arch():
    """The compute capability of the current CUDA device, as Triton sees it (e.g. 90): what
    launchers pass as `arch` to the kernels' choose_tiles."""
    import triton
    return triton.runtime.driver.active.get_current_target().arch


def archs(kernel):
    """The compute capabilities the table lists for `kernel`, ascending (e.g. [80, 90])."""
    return sorted(int(key[3:]) for key in _table()[kernel] if key.startswith("sm_"))


def entries(kernel, arch, half):
    """Every entry's {field: value} for `kernel` at the listed arch `arch` and the dtype class,
    in table order: the tiles an ahead-of-time build compiles."""
    spec = _table()[kernel]
    return [dict(zip(spec["fields"], entry["tiles"]))
            for entry in spec[f"sm_{arch}"]["half" if half else "fp32"]]


def lookup(kernel, arch, half, **sizes):
    """{field: value} of the first entry for `kernel` at compute capability `arch` (e.g. 90) and
    dtype class (half: fp16/bf16, else fp32) whose max_<size> bounds all hold for `sizes`
    (the kernel's "sizes", all given)."""
    spec = _table()[kernel]
    if set(sizes) != set(spec["sizes"]):
        raise ValueError(f"tile lookup for {kernel}: sizes {sorted(sizes)}, the table's are "
                         f"{sorted(spec['sizes'])}")
    listed = max((a for a in archs(kernel) if a <= arch), default=archs(kernel)[0])
    for entry in spec[f"sm_{listed}"]["half" if half else "fp32"]:
        if all(sizes[name] <= entry.get(f"max_{name}", sizes[name]) for name in sizes):
            return dict(zip(spec["fields"], entry["tiles"]))
    raise ValueError(f"tile table: no entry of {kernel} sm_{listed} holds {sizes}")
