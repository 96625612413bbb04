"""Where code would make a GPU wait for the host, found on a machine without one.

On a GPU the host queues kernels ahead of the device. A copy between host and device memory made without
``non_blocking`` (PyTorch's ``memcpy_and_sync``) and every value read back (``.item()``, ``bool(t)``,
``nonzero``) drain that queue, and the device then idles while Python launches the next kernels. Inside a loop
over timesteps such a point costs once per denoiser pass (or per captured layer).

`DeviceTraffic` runs code on the "meta" device (shapes only: no memory, no arithmetic) and records those points
with a torch dispatch mode, each with the line of this package, diffusers or the benchmarks that caused it.
One emulation makes it faithful: `torch.tensor(data, device=...)` builds a meta tensor directly, whereas on
CUDA it fills a host tensor and copies it over; inside the block it does the latter, so such copies are recorded
too. A value read back from a meta tensor has nothing to give: it raises AssertionError naming the line. On a
GPU itself, torch's own `torch.cuda.set_sync_debug_mode` counts the real synchronisations (the GPU benchmark).
"""

from __future__ import annotations

import collections
import functools
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that read a device value back to the host
READ_BACK = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal")
#: the code whose lines are reported (the innermost frame in one of these)
_ROOTS = ("conceptdistill/", "diffusers/", "experiments/")


def _caller() -> str:
    """'file:line' of the innermost frame in this package (other than this module), diffusers or experiments/."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename.replace("\\", "/")
        if name.endswith("utils/device_traffic.py"):
            continue
        for root in _ROOTS:
            if root in name:
                return f"{root}{name.rsplit(root, 1)[1]}:{frame.lineno}"
    return "?"


class DeviceTraffic(TorchDispatchMode):
    """``with DeviceTraffic() as traffic:`` records in `traffic.points`, a Counter of (kind, 'file:line'), each
    copy between devices ("host->device", "device->host") and each value read back ("read back") made while the
    block runs. Run the code on the "meta" device inside it.

    Raises:
        AssertionError: when the code reads a value back from a meta tensor (on a GPU: a wait for the device).
    """

    def __init__(self) -> None:
        super().__init__()
        self.points: collections.Counter[tuple[str, str]] = collections.Counter()
        self._tensor = torch.tensor

    def __enter__(self):
        original = self._tensor

        @functools.wraps(original)
        def tensor(data, *args, device=None, **kwargs):  # CUDA's path: a host tensor, then a copy
            made = original(data, *args, **kwargs)
            return made if device is None else made.to(device)

        torch.tensor = tensor
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor = self._tensor
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        copy_into = name.startswith("aten.copy_")
        if copy_into or name.startswith("aten._to_copy"):
            result = func(*args, **(kwargs or {}))
            source, target = (args[1], args[0]) if copy_into else (args[0], result)
            if source.device.type != target.device.type:
                kind = "host->device" if source.device.type == "cpu" else "device->host"
                self.points[(kind, _caller())] += 1
            return result
        devices = [a.device.type for a in args if isinstance(a, torch.Tensor)]
        if name.startswith(READ_BACK) and any(device != "cpu" for device in devices):
            self.points[("read back", _caller())] += 1
            if "meta" in devices:  # a meta tensor has no value to give
                raise AssertionError(f"a value is read back from the device at {_caller()}")
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        """All points recorded."""
        return sum(self.points.values())

    def growth(self, fewer: DeviceTraffic) -> dict[tuple[str, str], tuple[int, int]]:
        """{point: (count in `fewer`, count here)} for the points seen more often here than in `fewer`, a run of
        the same code over fewer steps: what happens once per step."""
        return {point: (fewer.points[point], count) for point, count in self.points.items() if count > fewer.points[point]}
