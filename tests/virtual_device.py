"""A virtual accelerator: code runs on the CPU while every tensor carries the device it would be on.

`virtual_device("cuda")` makes `torch.cuda.is_available()` true and runs every tensor operation on
the CPU, tagging each result with the device PyTorch would have put it on: a factory or `.to()`
given the device makes a tensor of it, anything else inherits its inputs' device. An operation
that mixes devices raises what PyTorch raises on an accelerator ("Expected all tensors to be on
the same device"), with PyTorch's own exceptions: a zero-dimensional CPU tensor is a scalar, an
index may be a CPU tensor, copies cross devices. `.numpy()` of a device tensor is refused as on
the device; under "mps", float64 is refused too (MPS has no float64). So the CUDA and MPS paths of
a pipeline can be checked for device mix-ups on a machine without either, with real values: what
it cannot see is what only the hardware does (kernels, memory, nondeterminism). Composites that
PyTorch builds in C++ from their input's real (CPU) options would look like CPU tensors; the one
this code base uses (`one_hot`) keeps its input's device; in a backward pass (whose formulas pass
their inputs' real options), a tensor made like another goes where that one is, and one made from
nothing takes the device of what it meets, also when a vmapped backward pass (`is_grads_batched`)
writes into it. The gradients given to `torch.autograd.grad` and `backward` must be on their
outputs' devices, which the engine checks in C++ on the real ones and this checks on the virtual ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_TAG = "_virtual_device"
# Autograd's backward formulas make tensors in C++ from the real (CPU) options of their inputs: a
# tensor made from nothing during a backward pass is undecided, and takes the device of what it meets.
_ANY = "_virtual_device_undecided"
# operations whose tensors may sit on different devices in PyTorch itself
_CROSSING = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.index.Tensor,
             torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
             torch.ops.aten._index_put_impl_.default, torch.ops.aten.lift_fresh.default,
             torch.ops.aten.set_.source_Tensor}


def device_of(t: torch.Tensor) -> torch.device:
    """The device a tensor would be on."""
    return getattr(t, _TAG, None) or torch.device("cpu")


class _Simulated(TorchDispatchMode):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def _wanted(self, kwargs: dict) -> tuple[dict, torch.device | None]:
        """The kwargs with a virtual device replaced by the CPU, and the device asked for (if any)."""
        device = kwargs.get("device")
        if device is None:
            return kwargs, None
        device = torch.device(device)
        if device.type == self.kind:
            device = torch.device(self.kind, device.index or 0)
            return {**kwargs, "device": torch.device("cpu")}, device
        return kwargs, device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, wanted = self._wanted(kwargs or {})
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        known = [t for t in tensors if not getattr(t, _ANY, False)]
        if func not in _CROSSING:
            on = {device_of(t) for t in known if not (t.dim() == 0 and device_of(t).type == "cpu")}
            if len(on) > 1:
                a, b = sorted(on, key=str)[:2]
                shapes = ", ".join(f"{tuple(t.shape)} on {device_of(t)}" for t in tensors)
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                                   f"devices, {a} and {b}! (in {func}: {shapes})")
        out = func(*args, **kwargs)
        undecided = bool(tensors) and not known
        if wanted is not None and wanted.type == "cpu" and torch._C._current_graph_task_id() != -1:
            # in a backward pass, a CPU device was read from real options: the result goes where its input is
            undecided, wanted = undecided or not tensors, None
        if wanted is not None:
            device = wanted
        elif func in (torch.ops.aten.copy_.default, torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default) \
                and not getattr(args[0], _ANY, False):  # written into an undecided tensor: as any other operation
            device = device_of(args[0])
        else:
            device = next((device_of(t) for t in known if device_of(t).type != "cpu"), torch.device("cpu"))
        if device.type == "mps":
            dtypes = {t.dtype for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
            if torch.float64 in dtypes:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
                                f"support float64. Please use float32 instead. (in {func})")

        def tag(t):
            if isinstance(t, torch.Tensor):
                setattr(t, _TAG, None if device.type == "cpu" else device)
                setattr(t, _ANY, bool(undecided) and device.type == "cpu")
            return t

        return tree_map(tag, out)


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`: a copy (autograd follows it), as PyTorch copies between devices."""
    out = t.clone()
    setattr(out, _TAG, None if device.type == "cpu" else device)
    return out


def _to(original):
    def to(self, *args, **kwargs):
        args = list(args)
        flags = []  # non_blocking and copy, given by position
        while args and isinstance(args[-1], bool):
            flags.insert(0, args.pop())
        non_blocking = kwargs.pop("non_blocking", flags[0] if flags else False)
        copy = kwargs.pop("copy", flags[1] if len(flags) > 1 else False)
        kwargs.pop("memory_format", None)
        if args and isinstance(args[0], torch.Tensor):  # to(other): other's device and dtype
            device, dtype = device_of(args[0]), args[0].dtype
        else:
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        target = device_of(self) if device is None else torch.device(device)
        if target.type != "cpu" and target.index is None:
            target = torch.device(target.type, 0)
        out = original(self, torch.device("cpu"), dtype or self.dtype, non_blocking, copy)
        if out is self:  # PyTorch returned it as it is (it is on the CPU): a device change is a copy
            return out if target == device_of(self) else _moved(self, target)
        setattr(out, _TAG, None if target.type == "cpu" else target)
        return out
    return to


def _cpu(self, *args, **kwargs):
    return self if device_of(self).type == "cpu" else _moved(self, torch.device("cpu"))


def _data(original):
    """Tensor.data: read, an alias on the same device; assigned (as `Module.to` does), the new device."""
    def get(self):
        out = original.__get__(self)
        setattr(out, _TAG, getattr(self, _TAG, None))
        return out

    def set(self, new):
        original.__set__(self, new)
        setattr(self, _TAG, getattr(new, _TAG, None))
    return property(get, set)


def _from_data(original, kind: str):
    """torch.tensor / as_tensor: built from Python data outside the dispatcher's reach, so on the CPU
    first and then moved."""
    def make(data, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type == kind:
            return original(data, *args, **kwargs).to(device)
        return original(data, *args, device=device, **kwargs)
    return make


def _keeps_device(original):
    """A composite PyTorch builds in C++ from its input's real (CPU) options: its result is put back on
    the input's device."""
    def call(t, *args, **kwargs):
        device = getattr(t, _TAG, None)
        setattr(t, _TAG, None)  # inside, everything is on the CPU
        try:
            out = original(t, *args, **kwargs)
        finally:
            setattr(t, _TAG, device)
        setattr(out, _TAG, device)
        return out
    return call


def _numpy(original):
    def numpy(self, *args, **kwargs):
        if device_of(self).type != "cpu":
            raise TypeError(f"can't convert {device_of(self).type} device type tensor to numpy. Use Tensor.cpu() "
                            "to copy the tensor to host memory first.")
        return original(self, *args, **kwargs)
    return numpy


def _checks_root_grads(original):
    """torch.autograd.grad / backward: the engine checks, in C++ on the real devices, that each given
    gradient is on its output's device; here the virtual devices are compared the same way."""
    at = 1 if original is torch.autograd.grad else 0  # grad(outputs, inputs, grad_outputs); backward(tensors, grad_tensors)

    def call(outputs, *args, **kwargs):
        grads = kwargs.get("grad_outputs", kwargs.get("grad_tensors"))
        if grads is None and len(args) > at:
            grads = args[at]
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        given = [grads] if isinstance(grads, torch.Tensor) else list(grads or [])
        for i, (out, grad) in enumerate(zip(outs, given, strict=False)):  # no gradients given: nothing to check
            if isinstance(grad, torch.Tensor) and device_of(grad) != device_of(out) \
                    and not (grad.dim() == 0 and device_of(grad).type == "cpu"):  # a CPU scalar is moved
                raise RuntimeError(f"invalid gradient at index {i} - expected device {device_of(out)} but got "
                                   f"{device_of(grad)}")
        return original(outputs, *args, **kwargs)
    return call


@contextmanager
def virtual_device(kind: str = "cuda") -> Iterator[None]:
    """Inside: the device `kind` ('cuda' or 'mps') exists, simulated on the CPU (see the module docstring)."""
    base = torch._C.TensorBase
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.Tensor, "device", property(device_of)))
        stack.enter_context(mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: device_of(t).type == "cuda")))
        stack.enter_context(mock.patch.object(torch.Tensor, "is_mps", property(lambda t: device_of(t).type == "mps")))
        stack.enter_context(mock.patch.object(torch.Tensor, "is_cpu", property(lambda t: device_of(t).type == "cpu")))
        stack.enter_context(mock.patch.object(torch.Tensor, "numpy", _numpy(base.numpy)))
        stack.enter_context(mock.patch.object(torch.Tensor, "to", _to(base.to)))
        stack.enter_context(mock.patch.object(torch.Tensor, "cpu", _cpu))
        stack.enter_context(mock.patch.object(torch.Tensor, "data", _data(base.data)))
        if kind == "cuda":
            stack.enter_context(mock.patch("torch.cuda.is_available", return_value=True))
            stack.enter_context(mock.patch("torch.cuda.device_count", return_value=1))
            stack.enter_context(mock.patch("torch.cuda._lazy_init", lambda: None))  # no driver to start
        else:
            stack.enter_context(mock.patch("torch.backends.mps.is_available", return_value=True))
        stack.enter_context(mock.patch.object(torch.nn.functional, "one_hot", _keeps_device(torch.nn.functional.one_hot)))
        for name in ("grad", "backward"):
            stack.enter_context(mock.patch.object(torch.autograd, name, _checks_root_grads(getattr(torch.autograd, name))))
        for name in ("tensor", "as_tensor"):
            stack.enter_context(mock.patch.object(torch, name, _from_data(getattr(torch, name), kind)))
        stack.enter_context(_Simulated(kind))
        yield
