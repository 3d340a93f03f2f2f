"""CDPruner (Zhang et al., NeurIPS 2025): keep the vision tokens that are diverse given the instruction, by
greedy MAP inference of a determinantal point process."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import TokenReducer, register
from tokred.tokens import VisionTokens


def relevance(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(n,) each token's relevance to the text, min-max scaled into (0, 1]: the mean negated cosine similarity
    to the text tokens (the sign the official code uses)."""
    score = -(F.normalize(features.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T).mean(-1)
    return (score - score.min() + 1e-6) / (score.max() - score.min() + 1e-6)


def conditional_kernel(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(n, n) the DPP kernel L = diag(r) S diag(r): cosine similarity S of the tokens, weighted by relevance r."""
    unit = F.normalize(features.float(), dim=-1)
    r = relevance(features, text)
    return r[:, None] * (unit @ unit.T) * r[None]


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) indices in pick order: the fast greedy MAP of a DPP (Chen et al., 2018), each pick the token that
    most increases the log-determinant of the kept set's kernel (an incremental Cholesky factorisation).
    Once the kept set spans the kernel's rank no pick can add volume; the rest go by the kernel's diagonal."""
    n = kernel.shape[0]
    gains = kernel.diagonal().clone()
    factors = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)
    picked: list[int] = []
    for i in range(k):
        j = int(gains.argmax())
        if not gains[j] > 1e-9:  # rank exhausted (or no finite gain left)
            taken = set(picked)
            picked += [t for t in kernel.diagonal().argsort(descending=True).tolist() if t not in taken][: k - i]
            break
        picked.append(j)
        row = (kernel[j] - factors[:i, j] @ factors[:i]) / gains[j].sqrt()
        factors[i] = row
        gains = gains - row * row
        gains[picked] = -float("inf")
    return torch.tensor(picked, device=kernel.device)


@register("cdpruner", stage="pre_llm")
@dataclass(frozen=True)
class CDPruner(TokenReducer):
    """Keep the k tokens of greedy DPP MAP under a kernel of feature similarity weighted by relevance to the
    prompt. Deliberate difference from the official code (LLaVA only, with CLIP's text encoder): features and
    text are the LLM's input embeddings, and the text is the prompt's every text token (chat template
    included), so it serves every family."""

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        if tokens.context is None or len(tokens.context) == 0:
            raise RuntimeError("CDPruner needs the prompt's text tokens beside the image")
        return greedy_map(conditional_kernel(tokens.embeds, tokens.context), k).sort().values
