"""lmfusion: LMFusion (arXiv 2412.15188) over HuggingFace Llama-family language models."""

from .config import LMFusionConfig
from .model.lmfusion import LMFusionModel

__all__ = ["LMFusionConfig", "LMFusionModel"]
__version__ = "0.1.0"
