"""Writing a trained network in kohya's format: the tensors at the save precision, and
never a file with a NaN or inf in it."""

from __future__ import annotations

from pathlib import Path

import torch
from lycoris.kohya import LycorisNetworkKohya
from torch import Tensor

from meebs.errors import TrainingDiverged
from meebs.files.safetensors_io import save_file_atomic

# output.save_precision -> the dtype of the saved tensors
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def network_state_dict(network: LycorisNetworkKohya, dtype: torch.dtype) -> dict[str, Tensor]:
    """The kohya-named tensors, cast to the save precision: CPU, contiguous, copies."""
    return {
        key: value.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
        for key, value in network.state_dict().items()
    }


def save_network(
    network: LycorisNetworkKohya,
    path: Path,
    metadata: dict[str, str],
    dtype: torch.dtype,
    *,
    overwrite: bool = False,
) -> None:
    """Write the network as kohya does (with `sshs_model_hash`), atomically, reproducibly;
    never a file with a NaN or inf in it (`refuse_non_finite`)."""
    tensors = network_state_dict(network, dtype)
    refuse_non_finite(tensors, path, network.state_dict())
    save_file_atomic(tensors, path, metadata, overwrite=overwrite, add_hashes=True)


def refuse_non_finite(saved: dict[str, Tensor], path: Path, trained: dict[str, Tensor]) -> None:
    """Stop before writing `saved` (the tensors as cast to the save precision) if any
    value is NaN or inf. A loader would apply such a file without a word and draw black
    or noise; the cause is nearly always a learning rate too high, either for the
    weights themselves or for the save dtype's range (fp16 ends at 65504)."""
    bad = sum(int((~torch.isfinite(t)).sum()) for t in saved.values() if t.is_floating_point())
    if not bad:
        return
    total = sum(t.numel() for t in saved.values())
    dtype = next(t.dtype for t in saved.values() if t.is_floating_point())
    if all(torch.isfinite(t).all() for t in trained.values() if t.is_floating_point()):
        largest = max(float(t.detach().abs().max()) for t in trained.values() if t.numel())
        raise TrainingDiverged(
            f"{path}: not written: {bad:,} of {total:,} values overflow {_name(dtype)} to inf "
            f"(largest |value| {largest:.3g}, {_name(dtype)} holds up to "
            f"{torch.finfo(dtype).max:.5g}); lower the learning rate, or save in a wider "
            "type (output.save_precision: bf16 or fp32)"
        )
    raise TrainingDiverged(
        f"{path}: not written: {bad:,} of {total:,} values are NaN or inf, so training has "
        "diverged; lower the learning rate and train again"
    )


def _name(dtype: torch.dtype) -> str:
    return next((name for name, known in SAVE_DTYPES.items() if known == dtype), str(dtype))
