"""The paper's network: Restormer whose latent and decoder blocks are enhanced transformer blocks.

An enhanced transformer block (ETB) puts the Perceive-IR conditioning between the two halves of
a Restormer block::

    x = x + MDTA(LN(x))
    x = PGCA(Q=PGM(x, [Z, F_l]), K=V=x)    (residual on x; the LayerNorms sit inside PGCA)
    x = x + GDFN(LN(x))

Every block of the latent and of the three decoder levels is an ETB; the encoder and refinement
blocks stay plain and there are no PromptIR prompt blocks. The hook-attached ``perceive_ir``
conditioning instead conditions each decoder level's output once, which needs no knowledge of
the backbone; the prior cannot reach inside a block that way, so this network is built from a
``restormer`` backbone (``prompts: false``) whose latent and decoder blocks it converts in place.
The converted blocks keep the parameter names of the plain ones.
"""

from __future__ import annotations

import torch
from torch import nn

from perceive_ir.models.conditioning import (
    ConditionedRestorer,
    ConditioningConfig,
    PerceiveIRConditioning,
    Prior,
    StageConditioner,
)
from perceive_ir.models.layers import pad_to_multiple
from perceive_ir.models.restormer import Restormer, TransformerBlock

__all__ = ["EnhancedTransformerBlock", "ETBRestorer"]


class EnhancedTransformerBlock(nn.Module):
    """A Restormer block with PGM and PGCA between attention and feed-forward.

    Without a prior it computes exactly the plain block it was made from.
    """

    def __init__(self, block: TransformerBlock, condition: StageConditioner) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.ffn = block.norm1, block.attn, block.norm2, block.ffn
        self.condition = condition

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if prior is not None:
            x = self.condition(x, prior)
        return x + self.ffn(self.norm2(x))


class ConditionedLevel(nn.Sequential):
    """The blocks of one level, each given the same prior vector."""

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        for block in self:
            x = block(x, prior)
        return x


class ETBRestorer(nn.Module):
    """``restored = net(degraded, cond)``, with the interface of the hook-attached restorer.

    ``cond`` is a :class:`Prior` (computed from ``degraded`` when omitted). ``backbone`` alone
    still runs as the plain Restormer, its ETBs skipping the conditioning.
    """

    def __init__(self, backbone: nn.Module, cfg: ConditioningConfig) -> None:
        super().__init__()
        if not isinstance(backbone, Restormer) or backbone.cfg.prompts:
            raise ValueError(
                "conditioning 'perceive_ir_etb' needs backbone 'restormer' with prompts: false "
                f"(the ETB network has no prompt blocks); got {type(backbone).__name__}"
                + (" with prompts: true" if isinstance(backbone, Restormer) else "")
            )
        if cfg.stages is not None:
            raise ValueError(
                "conditioning 'perceive_ir_etb' conditions every latent and decoder block; "
                "stages/stage_channels only apply to the hook-attached 'perceive_ir'"
            )
        self.backbone = backbone
        self.conditioning = PerceiveIRConditioning(cfg, stage_channels=[])  # CFE, SGM; PGM/PGCA are in the blocks
        semantic = self.conditioning.semantic
        prior_dim = cfg.code_dim + (semantic.dim if semantic is not None else 0)
        for name, channels in backbone.decoder_stages():  # latent, decoder3, decoder2, decoder1
            blocks = backbone.get_submodule(name)
            etbs = (EnhancedTransformerBlock(b, StageConditioner(channels, prior_dim, cfg)) for b in blocks)
            setattr(backbone, name, ConditionedLevel(*etbs))

    # both restorers keep the CFE and SGM in ``self.conditioning``
    prior = ConditionedRestorer.prior
    encode_degradation = ConditionedRestorer.encode_degradation

    def forward(self, degraded: torch.Tensor, cond: Prior | None = None) -> torch.Tensor:
        prior = cond if cond is not None else self.prior(degraded)
        # latent <-> deepest DINOv2 layer, decoder level 1 <-> shallowest, as for the hooks
        latent_p, dec3_p, dec2_p, dec1_p = (prior.vector(level, 4) for level in range(4))
        net = self.backbone
        x, (h, w) = pad_to_multiple(degraded, 8)
        e1 = net.encoder1(net.embed(x))
        e2 = net.encoder2(net.down1(e1))
        e3 = net.encoder3(net.down2(e2))
        z = net.latent(net.down3(e3), latent_p)
        d3 = net.decoder3(net.reduce3(torch.cat([net.up3(z), e3], dim=1)), dec3_p)
        d2 = net.decoder2(net.reduce2(torch.cat([net.up2(d3), e2], dim=1)), dec2_p)
        d1 = net.decoder1(torch.cat([net.up1(d2), e1], dim=1), dec1_p)
        out = net.output(net.refinement(d1)) + x[:, : net.cfg.out_channels]
        return out[..., :h, :w]
