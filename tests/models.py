"""Small instances of each model family the core must handle, with example inputs."""

import timm
import torch

from swr.tasks.backbones import create_backbone

FAMILIES = {
    # name: (factory, example input shape)
    "resnet": (lambda: timm.create_model("resnet18", num_classes=7), (2, 3, 32, 32)),
    "mobilenetv3": (lambda: timm.create_model("mobilenetv3_small_050", num_classes=7),
                    (2, 3, 32, 32)),
    "efficientnet": (lambda: timm.create_model("efficientnet_b0", num_classes=7), (2, 3, 32, 32)),
    "convnext": (lambda: timm.create_model("convnext_atto", num_classes=7), (2, 3, 32, 32)),
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=7),
            (2, 3, 32, 32)),
    "bcresnet": (lambda: create_backbone("bcresnet-1", num_classes=7), (2, 1, 40, 101)),
}


def make(family: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = FAMILIES[family]
    model = factory().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x
