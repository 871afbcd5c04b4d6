"""Input checks shared by the fused Gemma 4 kernels.

The kernels index raw pointers, so a wrong shape, dtype, device or stride would not raise inside Triton: it
would read the wrong memory. Every public wrapper checks its inputs here first and raises ``ValueError``
(shape / stride / device problems) or ``TypeError`` (dtype problems) naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ACT_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype] = ACT_DTYPES,
    shape: Sequence[int | None] | None = None,
    last_contiguous: bool = True,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check one tensor argument; ``None`` in ``shape`` means any size for that dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: dtype {t.dtype} not supported (allowed: {allowed})")
    if shape is not None:
        for dim, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
            if want is not None and want != got:
                raise ValueError(f"{name}: expected size {want} in dim {dim}, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    if last_contiguous and t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must have stride 1, got strides {t.stride()}")
    if ndim == 2 and t.numel() > 0 and t.stride(0) < t.shape[1]:
        # Rows that overlap would make the kernel read and write the same elements from two programs.
        raise ValueError(f"{name}: row stride {t.stride(0)} is smaller than the row length {t.shape[1]}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device; kernels launch on the first one's device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{n}={d}" for n, d in devices.items())
            raise ValueError(f"all tensors must be on one device; got {listing} ({name} differs)")
    return first


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    first = next(iter(dtypes.values()))
    if any(d != first for d in dtypes.values()):
        listing = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"activation tensors must share one dtype; got {listing}")
    return first


def check_eps(eps: float) -> float:
    if not (isinstance(eps, float | int) and eps > 0.0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def check_scalar_tensor(name: str, t: object) -> torch.Tensor:
    """The layer scalar is a 1-element tensor (a model buffer), read on the device so graphs stay valid."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-element torch.Tensor, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name}: expected exactly one element, got shape {tuple(t.shape)}")
    if t.dtype not in ACT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported")
    return t
