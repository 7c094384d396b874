"""Tiny models for tests and examples (``<module>:<callable>`` specs); CPU-sized, no downloads."""

from __future__ import annotations

from torch import nn


def tiny_torchvision_vit() -> nn.Module:
    """torchvision's ``VisionTransformer`` at 32 px: 8 px patches (a 4 x 4 token grid plus the
    class token), 2 layers, width 32, 5 classes. torchvision initialises the head to zeros (all
    logits 0, every gradient 0); here it gets N(0, 0.02) weights from torch's generator, so a
    seeded random network explains something."""
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )  # fmt: skip
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model
