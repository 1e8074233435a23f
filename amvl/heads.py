"""Gaussian heads on the query slots' hidden states, the slots' own embeddings, and the
injector of latents into the decoder's input embeddings."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class WideLinear(nn.Linear):
    """A linear layer computed in at least fp32 (fp64 for an fp64 layer), whatever its own
    dtype, its input's or autocast's; the output is in that wider dtype.

    The heads call it as a module rather than reading its weight in their own forward:
    DeepSpeed ZeRO-3 gathers a module's partitioned parameters only around that module's own
    forward (its prefetching hides this in small models' training, not in ``generate``)."""

    def forward(self, x: Tensor) -> Tensor:
        """x @ weight.T + bias in the wider of fp32 and the layer's dtype, autocast off."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.linear(x.to(dtype), self.weight.to(dtype),
                                        None if self.bias is None else self.bias.to(dtype))


class GaussianHead(nn.Module):
    """Hidden states (..., hidden) -> (mu, logvar), each (..., d).

    The log-variance is bounded, logvar = lo + (hi - lo) * sigmoid(raw + shift), so no slot
    can leave the kernels' safe range or collapse to a point. ``shift`` puts logvar at
    ``logvar_init`` when the linear layer outputs 0, which is where it starts. A start well
    below 0 keeps the noise from drowning the means early on, when the decoder would otherwise
    learn to ignore the latents (posterior collapse).
    """

    def __init__(self, hidden_size: int, latent_dim: int, logvar_min: float = -10.0,
                 logvar_max: float = 4.0, logvar_init: float = 0.0):
        super().__init__()
        if not logvar_min < logvar_init < logvar_max:
            raise ValueError(f"need logvar_min < logvar_init < logvar_max, got {logvar_min}, "
                             f"{logvar_init}, {logvar_max}")
        self.latent_dim = latent_dim
        self.logvar_min, self.logvar_max = logvar_min, logvar_max
        self.proj = WideLinear(hidden_size, 2 * latent_dim)
        nn.init.normal_(self.proj.weight, std=0.02)
        with torch.no_grad():
            # The log-variance rows start at zero: every slot at logvar_init whatever the
            # hidden size (with N(0, 0.02) rows its spread grew with it: a std of 3.4 nats at
            # 4096 wide, nearly the whole allowed range).
            self.proj.weight[latent_dim:].zero_()
        nn.init.zeros_(self.proj.bias)
        start = (logvar_init - logvar_min) / (logvar_max - logvar_min)
        self.shift = math.log(start / (1 - start))

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) in fp32 (fp64 for a fp64 head), whatever the head's dtype or autocast:
        fp16 cannot hold the KL's gradients at the bounds (dKL/dmu_p = diff * exp(-lv_p) is
        66,000 at lv_p = -10, diff = 3), and the span magnifies a bf16 sigmoid's rounding
        (0.06 nats, a few dozen distinct values). The projection reads only the K query
        slots' hidden states, so the wide products cost nothing that shows."""
        mu, raw = self.proj(hidden).chunk(2, dim=-1)
        span = self.logvar_max - self.logvar_min
        return mu, self.logvar_min + span * torch.sigmoid(raw + self.shift)


class LatentInjector(nn.Module):
    """Projects latents (B, K, d) to the hidden size and writes them over the embeddings of the
    K placeholder tokens of each row."""

    def __init__(self, latent_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(latent_dim, hidden_size)

    def forward(self, embeds: Tensor, placeholders: Tensor | slice, z: Tensor) -> Tensor:
        """Return ``embeds`` (B, L, H) with rows' placeholder positions replaced by proj(z).

        ``placeholders`` is either a (B, L) bool mask marking exactly K positions in every row,
        in slot order (checked, which reads the counts back to the host), or a slice of K
        columns that hold the placeholders in every row (no search and no host sync: what the
        model passes, since it lays the sequences out itself).
        """
        if z.dim() != 3 or z.shape[0] != embeds.shape[0]:
            raise ValueError(f"z must be (B, K, d) with B={embeds.shape[0]}, got {tuple(z.shape)}")
        values = self.proj(z.to(self.proj.weight.dtype)).to(embeds.dtype)
        if isinstance(placeholders, slice):
            # Read as given, not through slice.indices: under torch.compile the sequence length
            # is symbolic, and indices() would pin it (a recompile for every prompt length).
            start, stop, step = placeholders.start, placeholders.stop, placeholders.step
            if (step not in (None, 1) or start is None or stop is None or start < 0
                    or stop - start != z.shape[1] or stop > embeds.shape[1]):
                raise ValueError(f"placeholders must be a slice of K={z.shape[1]} consecutive "
                                 f"columns within the {embeds.shape[1]} of embeds, got "
                                 f"{placeholders}")
            return torch.cat([embeds[:, :start], values, embeds[:, stop:]], dim=1)
        counts = placeholders.sum(-1)
        if not bool((counts == z.shape[1]).all()):
            raise ValueError(
                f"every row needs exactly K={z.shape[1]} latent placeholders, found "
                f"{counts.tolist()}")
        return embeds.masked_scatter(placeholders.unsqueeze(-1), values)


class SlotEmbeddings(nn.Module):
    """A learned vector per latent slot, added to the input embeddings of the K query slots.

    The K query slots of a side are copies of one special token. Without these vectors they
    differ only in their rotary positions, and a pretrained decoder gives them nearly one
    hidden state (SmolLM2-135M, K = 8: a cosine of 0.97-0.98 between slots), so the K
    Gaussians start as near copies of one. Slot k's vector is shared by the prior's and the
    posterior's slot k, the two Gaussians its KLs compare. They start as N(0, std^2);
    AMVLModel passes the spread of its base model's token embeddings, so that a slot's vector
    sets it as far apart as another token would.
    """

    def __init__(self, num_slots: int, hidden_size: int, std: float = 0.02):
        super().__init__()
        self.num_slots, self.hidden_size = num_slots, hidden_size
        # A parameter of this module itself, read in its own forward: DeepSpeed ZeRO-3 gathers
        # a partitioned parameter around the forward of the module that holds it.
        self.weight = nn.Parameter(torch.randn(num_slots, hidden_size) * std)

    def forward(self, embeds: Tensor, columns: slice) -> Tensor:
        """``embeds`` (B, L, H) with slot k's vector added at column ``columns.start + k``
        of every row; ``columns`` is a slice of K consecutive columns."""
        # Read as given, not through slice.indices, which would pin a symbolic length under
        # torch.compile (as the injector does).
        start, stop, step = columns.start, columns.stop, columns.step
        if (step not in (None, 1) or start is None or stop is None or start < 0
                or stop - start != self.num_slots or stop > embeds.shape[1]):
            raise ValueError(f"columns must be a slice of K={self.num_slots} consecutive "
                             f"columns within the {embeds.shape[1]} of embeds, got {columns}")
        if embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"embeds must have {self.hidden_size} features, got "
                             f"{embeds.shape[-1]}")
        slots = embeds[:, start:stop] + self.weight.to(embeds.dtype)
        return torch.cat([embeds[:, :start], slots, embeds[:, stop:]], dim=1)
