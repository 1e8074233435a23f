"""One weight gradient per linear layer for the two decoder passes of a prefix-shared step.

A prefix-shared step runs the decoder twice: the prefix pass over ``[x | P | y | Q]``, then
the latent pass over the short tail ``[<lat_start> z <lat_end> | y]``. Left to autograd, every
linear weight gets a gradient from each pass, and autograd adds the two: on the 7B proxy's
step (RESULTS.md) that addition was 2.1 ms of bf16 traffic over 933 M parameters, on top of the
latent pass's own weight-gradient GEMMs.

:class:`PairedWeightGrads` runs the decoder's ``nn.Linear`` layers through one autograd
function in both passes. The latent pass's backward, which autograd runs first (the latent
pass comes later in the graph and reads the prefix pass's keys), keeps what its weight
gradient is made of, its output gradient and inputs (a few dozen tokens a row: smaller than
the gradient, else it keeps the gradient), instead of handing a gradient over. The prefix
pass's backward multiplies them out and accumulates its own gradient into the result in the
same matrix product (``addmm_`` with beta = 1, whose read of the result overlaps the large
product's compute), so no latent gradient waits in memory through the prefix pass's backward,
as autograd's would, beside all of that pass's activations. Each weight receives one gradient,
so DDP's and FSDP's gradient hooks fire once, as they would for one pass. If the passes'
backwards ever run in the other order, each pass hands over its own gradient and autograd adds
them, as without pairing: the result is the same either way.

Only plain ``nn.Linear`` modules whose weight requires grad and holds at least
``MIN_PAIRED_NUMEL`` elements are paired (counted as ``in_features * out_features``: under FSDP
with ``use_orig_params`` a weight outside the layer's forward is only this rank's shard; the
others are left alone, without even a wrapper's host time), and only when the matrix products
run in the weight's dtype: under autocast to another dtype (fp32 weights, bf16 compute),
DeepSpeed's partitioned parameters, or a module whose ``forward`` someone else already
replaced (accelerate's hooks), the module runs as usual.

``AMVLModel`` pairs only with ``AMVLConfig(pair_weight_grads=True)``, off by default: on an
H200 whose host could not keep ahead of the GPU the pairing's Python took 5-7 ms more of the
7B proxy's step than its products saved (benchmarks/RESULTS.md, run 6); it saves the peak
memory of a layer's latent weight gradients.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# The autograd function runs in Python: on our 2-core CPU a paired use cost about 0.11 ms more
# host time than F.linear's (forward and backward). Pairing saves 4 bytes of memory traffic an
# element (the addition's 6 against the accumulating product's extra read of 2), about 22 us
# on an H100 for 2**24 elements. Smaller weights (attention projections of 7B-class models,
# everything of a 0.5B one, whose steps are bound by the host already) are left to autograd;
# the MLP weights of 7B-class models, 87% of the traffic, are paired.
MIN_PAIRED_NUMEL = 2**24

# Whether a latent pass keeps its gradient's factors (output gradient, inputs) where they are
# smaller than the gradient, for the prefix pass to multiply out: the step's peak memory then
# grows with the layers as plain fine-tuning's does (measured on the CPU at the 7B proxy's
# widths: +466 MB a layer, against +849 MB with the gradients kept). Off, the latent pass's
# products run in its own backward, where the device may be waiting for the host anyway
# (scripts/profile_model_step.py's provider "shared_amvl:kept_grads" times it).
KEEP_FACTORS = True


class _WeightRecord:
    """One weight's bookkeeping over one step: how many prefix-pass uses still owe their
    backward, and what the latent passes kept for them: the factors of their gradients
    (output gradient, inputs) while those are smaller than the gradient, else the gradient."""

    def __init__(self) -> None:
        self.pending_prefix = 0
        self.kept: Tensor | None = None
        self.factors: list[tuple[Tensor, Tensor]] = []
        # autograd runs the backward of a model spread over several GPUs on several threads
        self.lock = threading.Lock()

    def weight_grad(self, grad_out: Tensor, inputs: Tensor, prefix: bool) -> Tensor | None:
        """The gradient this use hands autograd for the weight (None: kept for the prefix
        pass), from its (tokens, out) output gradient and (tokens, in) inputs."""
        with self.lock:
            if prefix:
                self.pending_prefix -= 1
                kept = self._take_kept()
                if kept is not None:
                    return kept.addmm_(grad_out.t(), inputs)
                return grad_out.t().mm(inputs)
            if self.pending_prefix <= 0:  # the prefix pass's backward already ran
                return grad_out.t().mm(inputs)
            if self.kept is None and not self.factors:
                # A backward that never reaches the prefix pass (torch.autograd.grad of z,
                # backward(inputs=...) of the heads) does not want this weight's gradient:
                # drop it when that backward ends, or the next one would count it twice.
                torch.autograd.Variable._execution_engine.queue_callback(self._drop_kept)
            # The latent pass's backward runs first, and the prefix pass's activations are
            # all alive until theirs: a gradient kept here would add a whole set of weight
            # gradients to the step's peak memory (1.6 GB of the 7B proxy's 8 GB). Its factors
            # (82 tokens a row there) are a tenth of that; the product waits for the prefix
            # pass, and costs the same there.
            if KEEP_FACTORS and (grad_out.numel() + inputs.numel()
                                 < grad_out.shape[1] * inputs.shape[1]):
                self.factors.append((grad_out, inputs))
            elif self.kept is None:
                self.kept = grad_out.t().mm(inputs)
            else:  # a second latent pass (the prior-path NLL)
                self.kept.addmm_(grad_out.t(), inputs)
            return None

    def _take_kept(self) -> Tensor | None:
        """What the latent passes kept, as one gradient (None if nothing), and forget it."""
        kept, factors = self.kept, self.factors
        self.kept, self.factors = None, []
        for grad_out, inputs in factors:
            kept = grad_out.t().mm(inputs) if kept is None else kept.addmm_(grad_out.t(), inputs)
        return kept

    def _drop_kept(self) -> None:
        with self.lock:
            self.kept, self.factors = None, []


class _PairedLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient goes through a :class:`_WeightRecord`."""

    @staticmethod
    def forward(ctx, inputs: Tensor, weight: Tensor, bias: Tensor | None,
                record: _WeightRecord, prefix: bool) -> Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.record, ctx.prefix = record, prefix
        return F.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        inputs, weight = ctx.saved_tensors
        grad_in = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = ctx.record.weight_grad(flat_grad, inputs.reshape(-1, inputs.shape[-1]),
                                             ctx.prefix) if ctx.needs_input_grad[1] else None
        grad_bias = flat_grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_in, grad_weight, grad_bias, None, None


def _pairable(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.weight.requires_grad
            and "forward" not in module.__dict__ and not hasattr(module.weight, "ds_id"))


class PairedWeightGrads:
    """Pairs the weight gradients of ``decoder``'s linear layers across one step's passes.

    Use one instance per training step: the prefix pass inside :meth:`prefix_pass`, each latent
    pass inside :meth:`latent_pass`, then the backward. ``min_numel``: the smallest weight
    paired, default ``MIN_PAIRED_NUMEL``. Not under activation checkpointing: a checkpointed
    layer re-runs its forward in the backward, outside these contexts, and non-reentrant
    checkpointing then finds other tensors saved (``AMVLModel`` pairs only without it).
    """

    def __init__(self, decoder: nn.Module, min_numel: int | None = None) -> None:
        self.min_numel = MIN_PAIRED_NUMEL if min_numel is None else min_numel
        self.modules = [m for m in decoder.modules() if _pairable(m) and self.pairs(m)]
        self.records = {id(m): _WeightRecord() for m in self.modules}

    def pairs(self, module: nn.Linear) -> bool:
        """Whether ``module`` is large enough to pair, by the size of its full weight: under
        FSDP the weight it holds outside its forward is a shard, which may be empty, and
        would decide differently on each rank."""
        return module.in_features * module.out_features >= self.min_numel

    @contextlib.contextmanager
    def prefix_pass(self) -> Iterator[None]:
        """Context of the prefix pass: the paired layers' backward hands autograd this pass's
        weight gradient plus any the latent passes kept (accumulated in one product)."""
        with self._patched(prefix=True):
            yield

    @contextlib.contextmanager
    def latent_pass(self) -> Iterator[None]:
        """Context of a latent pass: the paired layers' backward keeps this pass's weight
        gradient for the prefix pass (or hands it over if that backward already ran)."""
        with self._patched(prefix=False):
            yield

    @contextlib.contextmanager
    def _patched(self, prefix: bool) -> Iterator[None]:
        for module in self.modules:
            module.forward = self._forward(module, self.records[id(module)], prefix)
        try:
            yield
        finally:
            for module in self.modules:
                module.__dict__.pop("forward", None)

    @staticmethod
    def _forward(module: nn.Linear, record: _WeightRecord, prefix: bool):
        def forward(inputs: Tensor) -> Tensor:
            weight = module.weight
            compute = torch.get_autocast_dtype(inputs.device.type) \
                if torch.is_autocast_enabled(inputs.device.type) else inputs.dtype
            # Compiled (a compiled decoder inside an eager step): Dynamo cannot trace the
            # record's lock, and would break the graph at every paired layer.
            if not torch.is_grad_enabled() or compute != weight.dtype \
                    or torch.compiler.is_compiling():
                return F.linear(inputs, weight, module.bias)
            if inputs.dtype != compute:
                # autocast's own cast, made outside the function so that the products inside
                # it (and in its backward, where autocast is off) see one dtype
                inputs = inputs.to(compute)
            if prefix:
                with record.lock:
                    record.pending_prefix += 1
            return _PairedLinear.apply(inputs, weight, module.bias, record, prefix)
        return forward
