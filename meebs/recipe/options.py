"""Which network options each LyCORIS algorithm implements (lycoris-lora 4.1.3).

lycoris takes every option for every algorithm and ignores, without a word, the ones an
algorithm does not implement: a recipe asking for DoRA on GLoRA would train plain GLoRA.
Here such a recipe is refused with the key and the fix. No torch import: the recipe
checks (meebs.recipe.checks) and `NetworkSpec` (meebs.network.build) share these rules.
"""

from __future__ import annotations

from typing import Protocol


class NetworkOptions(Protocol):
    """The network settings of a recipe (`NetworkSection`) or of a build (`NetworkSpec`)."""

    algo: str
    dora_wd: bool
    use_tucker: bool
    use_scalar: bool
    factor: int
    decompose_both: bool
    full_matrix: bool
    constraint: float
    rescaled: bool


DORA_ALGOS = ("lora", "locon", "loha", "lokr")
TUCKER_ALGOS = ("lora", "locon", "loha", "lokr")  # GLoRA's Tucker branch cannot be reached
SCALAR_ALGOS = ("lora", "locon", "loha", "lokr", "glora")
DROPOUT_ALGOS = ("lora", "locon")  # LoHA, LoKr and the rest ignore `dropout`


def option_problem(network: NetworkOptions) -> tuple[str, str] | None:
    """(recipe key, what is wrong and how to fix it) for the first option the network's
    algo does not implement or that cannot be combined; None if all is well."""
    algo, factor, constraint = network.algo, network.factor, network.constraint
    dora_wd, use_tucker, use_scalar = network.dora_wd, network.use_tucker, network.use_scalar
    decompose_both, full_matrix = network.decompose_both, network.full_matrix
    rescaled = network.rescaled
    if factor == 0 or factor < -1:
        return "network.factor", (
            f"{factor}: give -1 (as balanced as the shape allows) or a Kronecker factor >= 1"
        )
    if constraint < 0:
        return "network.constraint", f"{constraint}: must be >= 0"
    only = [
        ("dora_wd", dora_wd, DORA_ALGOS, "false"),
        ("use_tucker", use_tucker, TUCKER_ALGOS, "false"),
        ("use_scalar", use_scalar, SCALAR_ALGOS, "false"),
        ("factor", factor != -1, ("lokr",), "-1"),
        ("decompose_both", decompose_both, ("lokr",), "false"),
        ("full_matrix", full_matrix, ("lokr",), "false"),
        ("constraint", constraint != 0, ("diag-oft",), "0"),
        ("rescaled", rescaled, ("diag-oft",), "false"),
    ]
    for key, is_set, algos, default in only:
        if is_set and algo not in algos:
            return f"network.{key}", (
                f"is for network.algo {', '.join(algos)}, not {algo} (lycoris would ignore "
                f"it): set network.{key}: {default}, or another network.algo"
            )
    if full_matrix and decompose_both:
        return "network.decompose_both", (
            "network.full_matrix trains whole Kronecker factors, decompose_both low-rank "
            "ones: set one of them to false"
        )
    return None
