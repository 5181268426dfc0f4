"""Visual Prompt Tuning (Jia et al., ECCV 2022) for timm Vision Transformers.

``length`` learnable prompt tokens are inserted after the prefix (class/register)
tokens: once before the first block (VPT-shallow, ``vpt-shallow``), or afresh
before every block, replacing the previous block's prompt outputs (VPT-deep,
``vpt-deep``). The prompt outputs are dropped before the final norm and pooling,
so the head sees what it would see without prompts. Prompts are initialised
uniformly with the Xavier bound of the patch projection, as in the paper.

The longer token sequence stays in the task model: not foldable, and the extra
attention/MLP work is extra FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..reparam import head_parameters
from .base import Method, fit_size, head_state, new_head, register_method, train_only


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


class PromptedViT(nn.Module):
    """A timm VisionTransformer with prompt tokens (one set, or one per block)."""

    def __init__(self, vit: nn.Module, length: int, deep: bool):
        super().__init__()
        self.vit = vit
        depth = len(vit.blocks) if deep else 1
        ref = vit.patch_embed.proj.weight
        bound = math.sqrt(6.0 / (ref[0].numel() + vit.embed_dim))
        self.prompts = nn.Parameter(torch.empty(depth, length, vit.embed_dim, dtype=ref.dtype,
                                                device=ref.device).uniform_(-bound, bound))

    # timm's model interface, so head helpers and callers treat it like the ViT itself
    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        self.vit.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        n, length = vit.num_prefix_tokens, self.prompts.shape[1]
        for i, block in enumerate(vit.blocks):
            if i < len(self.prompts):
                prompts = self.prompts[i].expand(x.shape[0], -1, -1)
                rest = x[:, n:] if i == 0 else x[:, n + length:]
                x = torch.cat([x[:, :n], prompts, rest], dim=1)
            x = block(x)
        x = torch.cat([x[:, :n], x[:, n + length:]], dim=1)
        return vit.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_method
@dataclass
class VPTShallow(Method):
    """Prompts at the input of a timm ViT; ``length`` defaults to the longest that fits.

    ``updated_params`` counts the prompt elements (``depth x length x embed_dim``,
    depth 1 for shallow). Not foldable.
    """

    name = "vpt-shallow"
    tunables = {"length": [None, 2, 8]}
    #: One prompt set per block (deep) or one at the input (shallow).
    deep: ClassVar[bool] = False

    length: Optional[int] = None

    def unsupported_reason(self, model: nn.Module) -> Optional[str]:
        if _is_vit(model):
            return None
        return (f"{type(model).__name__} is not a timm VisionTransformer; visual prompts are "
                "tokens prepended to a ViT's token sequence, which a CNN does not have")

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        self.check_supported(model)
        head = new_head(model, task)
        depth = len(model.blocks) if self.deep else 1
        self.length = fit_size(self.name, "length", depth * model.embed_dim, 0, budget_params,
                               self.length)
        prompted = PromptedViT(model, self.length, self.deep)
        train_only(prompted, [prompted.prompts] + head)
        return prompted

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [model.prompts] + list(head_parameters(model).values())

    def updated_params(self, model: nn.Module) -> int:
        return model.prompts.numel()

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"prompts": model.prompts, **head_state(model)}


@register_method
@dataclass
class VPTDeep(VPTShallow):
    """Prompts before every block of a timm ViT (see :class:`VPTShallow`)."""

    name = "vpt-deep"
    deep: ClassVar[bool] = True
