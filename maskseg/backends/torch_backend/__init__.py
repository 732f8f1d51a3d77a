"""The torch backend: torchvision's Mask R-CNN, with the inference rewrites only it uses (``optimize``:
batch-norm folding, fused oneDNN convolutions; ``roi_pools``: RoIAlign as sparse-matrix products)."""

from .backend import TorchBackend

__all__ = ["TorchBackend"]
