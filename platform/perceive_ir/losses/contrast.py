"""L_cl: InfoNCE on CFE degradation codes.

For anchor i (a crop of degraded image i) the positive is ``positive[i]`` (another crop of the
same degraded image, for noise of the same noise realisation); the negatives are both codes of
every sample in the global batch whose degradation type differs from sample i's:

    L_i = -log( exp(a_i . p_i / t) / (exp(a_i . p_i / t) + sum_{j: type_j != type_i} sum_{v in {a_j, p_j}} exp(a_i . v / t)) )

Codes are L2-normalised. Under torch.distributed the keys are gathered from every rank; the
local slice keeps its gradient. Under gradient accumulation a forward holds one micro-batch of the
step; the trainer then computes the codes of the step's whole global batch first (no gradient) and
hands them over with :meth:`DegradationContrastLoss.use_step_keys`, so the negatives are the global
batch's at every world size and accumulation, exactly as without accumulation.

An anchor without a negative (no sample of another type in the global batch: a batch of one
type) has nothing to contrast with: it is left out of the mean, and the loss returns the fraction
of such anchors next to its value. With no anchor left the loss is 0, still a function of the
codes, so every CFE parameter gets a (zero) gradient, as DeepSpeed's collectives expect.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from perceive_ir.models.precision import at_least_fp32

__all__ = ["ContrastConfig", "DegradationContrastLoss", "gather_with_grad"]


@dataclasses.dataclass
class ContrastConfig:
    temperature: float = 0.1
    gather: bool = True  # negatives from the global batch when torch.distributed is initialised

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (equal shapes); gradient flows through the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


class DegradationContrastLoss(nn.Module):
    def __init__(self, cfg: ContrastConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ContrastConfig()
        self._step_keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice] | None = None

    def use_step_keys(self, anchors: torch.Tensor | None, positives: torch.Tensor | None = None,
                      types: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """The codes of the step's global batch (detached; normalised here), and the rows of the
        micro-batch the next forward gets (replaced by its live codes); ``None`` returns to gathering."""
        if anchors is None:
            self._step_keys = None
            return
        self._step_keys = (F.normalize(at_least_fp32(anchors), dim=-1), F.normalize(at_least_fp32(positives), dim=-1),
                           types, rows)

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor,
                types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``anchor``/``positive``: B x D codes; ``types``: B integer degradation labels.
        Returns (loss, fraction of anchors without a negative (detached))."""
        # fp32 whatever the codes' dtype: logits of cosines / 0.1 in bf16 would keep 2-3 digits
        anchor, positive = F.normalize(at_least_fp32(anchor), dim=-1), F.normalize(at_least_fp32(positive), dim=-1)
        if self._step_keys is not None:
            step_anchor, step_positive, all_types, rows = self._step_keys
            all_anchor = torch.cat([step_anchor[: rows.start], anchor, step_anchor[rows.stop:]])
            all_positive = torch.cat([step_positive[: rows.start], positive, step_positive[rows.stop:]])
        elif self.cfg.gather:
            all_anchor, all_positive = gather_with_grad(anchor), gather_with_grad(positive)
            all_types = gather_with_grad(types)
        else:
            all_anchor, all_positive, all_types = anchor, positive, types
        t = self.cfg.temperature
        pos_logit = (anchor * positive).sum(-1, keepdim=True) / t  # B x 1
        keys = torch.cat([all_anchor, all_positive], dim=0)  # 2N x D
        key_types = torch.cat([all_types, all_types], dim=0)
        neg_logits = anchor @ keys.t() / t  # B x 2N
        different = types[:, None] != key_types[None, :]
        neg_logits = neg_logits.masked_fill(~different, float("-inf"))
        logits = torch.cat([pos_logit, neg_logits], dim=1)
        per_anchor = torch.logsumexp(logits, dim=1) - pos_logit.squeeze(1)
        has_negative = different.any(dim=1)
        counted = has_negative.sum()
        loss = torch.where(has_negative, per_anchor, 0.0).sum() / counted.clamp_min(1)
        no_negative_frac = 1 - counted.float() / has_negative.numel()
        return loss, no_negative_frac.detach()
