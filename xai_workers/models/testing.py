"""Tiny models for tests and examples (``<module>:<callable>`` specs); CPU-sized, no downloads."""

from __future__ import annotations

from torch import nn


def tiny_torchvision_vit() -> nn.Module:
    """torchvision's ``VisionTransformer`` at 32 px: 8 px patches (a 4 x 4 token grid plus the
    class token), 2 layers, width 32, 5 classes."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )  # fmt: skip
