"""bfloat16 parameters updated with stochastic rounding, as Gopher trained its 7.1B and 280B models.

Rae et al. 2021, §3: "Models smaller than 7.1B are trained with mixed precision float32
parameters and bfloat16 activations, while 7.1B and 280B use bfloat16 activations and
parameters. bfloat16 parameters are updated using stochastic rounding to maintain stability."
Their Appendix C adds that stochastic rounding "does not fully recover mixed precision training
performance", and that bfloat16 parameters with a float32 copy in the optimiser state are
indistinguishable from float32 everywhere; Chinchilla (Hoffmann et al. 2022) kept that float32
copy. That is burrow's default (train.param_dtype "fp32" with bf16 autocast); "bf16" is Gopher's.

A bf16 value has float32's sign and exponent and the top 7 bits of its mantissa: the upper half
of a float32's bits. A step that moves a weight by less than half the gap to its neighbour (a
relative 2^-9) is lost entirely by rounding to nearest, however often it is repeated. Stochastic
rounding rounds x, lying a fraction f of the way from its neighbour below (toward zero) to the
one above, up with probability f: E[round(x)] = x, so small updates add up in expectation.

How the optimiser does it: neither torch's AdamW nor burrow's Adafactor knows of bf16, so each
step runs them on float32 parameters. Before the step every bf16 parameter's storage is swapped
for a float32 copy of its value (exact) and its gradient widened; the optimiser then computes the
update, weight decay included, in float32 against float32 moments, created float32 because the
parameter is float32 when they are; after the step each result is rounded stochastically back
into bf16 storage. Between steps the model holds bf16 parameters and no float32 copy (the point
of Gopher's setting). The optimiser stays the object it was (its state keyed by the parameters
themselves), so checkpoints save and load it as before; loading it also sees float32
parameters, or torch would cast the moments down to the parameters' dtype.

The random bits of a parameter's t-th update come from a generator seeded by (seed, the
parameter's place in the optimiser, t): t is in the optimiser's state, which checkpoints keep,
so a resumed run rounds exactly as one that never stopped, data-parallel replicas (the same
gradients) round alike and stay equal, and the global generator (dropout) is not touched.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

# A float32 whose lower 16 bits are zero is a bf16 value: the mask keeps the upper 16.
_BF16_BITS = -(1 << 16)  # 0xFFFF0000 as an int32


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 `x` rounded to bfloat16, away from zero with probability equal to the fraction of
    the gap between its two bf16 neighbours that separates it from the one nearer zero.

    Adding a uniform integer in [0, 2^16) to the float32 bits carries into the upper 16 (the
    bf16 value one step further from zero) exactly when it exceeds 2^16 minus the lower 16 bits:
    with probability (lower bits) / 2^16, the fraction of the gap. Values already in bf16 (lower
    bits zero) never carry; infinities stay infinite.
    """
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device,
                          generator=generator)
    return ((bits + noise) & _BF16_BITS).view(torch.float32).to(torch.bfloat16)


def store_in_bf16(model: nn.Module) -> None:
    """Store the model's floating-point parameters in bfloat16 (rounded to nearest once, at the
    start); buffers (position tables) keep their dtype."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.bfloat16)


class StochasticRounding:
    """Hooks on an optimiser whose parameters are bf16: each step runs in float32 and is rounded
    back stochastically (see the module's docstring). `round_stochastically` installs it."""

    def __init__(self, optimizer: torch.optim.Optimizer, seed: int):
        self.optimizer, self.seed = optimizer, seed
        self.index = {id(parameter): index for index, parameter in enumerate(
            parameter for group in optimizer.param_groups for parameter in group["params"])}
        self.parameters = [parameter for group in optimizer.param_groups
                           for parameter in group["params"] if parameter.dtype == torch.bfloat16]
        self.generators: dict[torch.device, torch.Generator] = {}
        optimizer.register_step_pre_hook(self.widen)
        optimizer.register_step_post_hook(self.round)
        optimizer.register_load_state_dict_pre_hook(self.widen_for_loading)
        optimizer.register_load_state_dict_post_hook(self.narrow_after_loading)

    def widen(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before a step: float32 copies of the parameters and their gradients (exact)."""
        for parameter in self.parameters:
            grad, parameter.grad = parameter.grad, None  # a grad must match its parameter
            parameter.data = parameter.data.float()
            if grad is not None:
                parameter.grad = grad.float()

    def round(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After a step: each updated parameter rounded stochastically back into bf16."""
        for parameter in self.parameters:
            grad, parameter.grad = parameter.grad, None
            if grad is None:  # not updated: its float32 value is its bf16 value
                parameter.data = parameter.data.to(torch.bfloat16)
                continue
            parameter.data = stochastic_round(parameter.data, self.generator(parameter))
            parameter.grad = grad.to(torch.bfloat16)  # exact: it was a bf16 gradient

    def generator(self, parameter: torch.Tensor) -> torch.Generator:
        """The generator of this parameter's current update: seeded by the run's seed, the
        parameter's place in the optimiser and how many updates it has had."""
        step = self.optimizer.state[parameter].get("step", 0)
        key = f"{self.seed}:{self.index[id(parameter)]}:{int(step)}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        device = parameter.device
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device)
        return self.generators[device].manual_seed(seed)

    def widen_for_loading(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        """torch casts loaded moments to their parameter's dtype: make that float32."""
        for parameter in self.parameters:
            parameter.data = parameter.data.float()

    def narrow_after_loading(self, optimizer: torch.optim.Optimizer) -> None:
        for parameter in self.parameters:
            parameter.data = parameter.data.to(torch.bfloat16)  # exact: bf16 values


def round_stochastically(optimizer: torch.optim.Optimizer, seed: int) -> torch.optim.Optimizer:
    """`optimizer`, its bf16 parameters now updated in float32 and rounded back stochastically;
    the noise of each update is a function of `seed` (the run's), so runs repeat exactly."""
    StochasticRounding(optimizer, seed)  # its hooks keep it alive with the optimiser
    return optimizer
