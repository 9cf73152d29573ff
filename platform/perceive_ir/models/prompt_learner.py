"""CoOp prompt learner: class-specific learnable context for the three quality tiers."""

from __future__ import annotations

import torch
from torch import nn

from perceive_ir.models.clip_backend import encode_text_embeddings

__all__ = ["PromptLearner"]


class PromptLearner(nn.Module):
    """One learned context of ``n_ctx`` tokens per tier; the text is ``[SOS] ctx_1..ctx_n . [EOS]``.

    Context vectors start from N(0, ``init_std``); when ``init_words`` is given, the last context
    token of tier k starts from the word embedding of ``init_words[k]`` (mean over its sub-tokens).
    Only ``self.context`` is trainable; the token embeddings around it are frozen buffers.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        n_classes: int = 3,
        n_ctx: int = 16,
        init_std: float = 0.02,
        init_words: list[str] | None = None,
    ) -> None:
        super().__init__()
        width = clip.token_embedding.weight.shape[1]
        placeholder = " ".join(["X"] * n_ctx) + "."
        tokens = tokenizer([placeholder] * n_classes)
        with torch.no_grad():
            embedded = clip.token_embedding(tokens.to(clip.token_embedding.weight.device))
            context = torch.randn(n_classes, n_ctx, width) * init_std
            if init_words is not None:
                if len(init_words) != n_classes:
                    raise ValueError(f"need {n_classes} init words, got {init_words}")
                for k, word in enumerate(init_words):
                    ids = tokenizer([word])[0]
                    ids = ids[(ids != 0)][1:-1]  # drop start/end tokens and padding
                    context[k, -1] = clip.token_embedding(ids.to(embedded.device)).mean(0).cpu()
        self.n_ctx = n_ctx
        self.context = nn.Parameter(context)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)

    def forward(self, clip: nn.Module) -> torch.Tensor:
        """L2-normalised text features of the tier prompts: n_classes x embed_dim."""
        # the wider of the two dtypes: a bf16-trained context next to the fp32 token embeddings
        dtype = torch.promote_types(self.context.dtype, self.prefix.dtype)
        embeddings = torch.cat([self.prefix.to(dtype), self.context.to(dtype), self.suffix.to(dtype)], dim=1)
        return encode_text_embeddings(clip, embeddings, self.tokens)
