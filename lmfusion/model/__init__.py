from .lmfusion import LMFusionModel, LMFusionOutput, LossOutput
from .sequence import MultimodalBatch, SequenceBuilder

__all__ = ["LMFusionModel", "LMFusionOutput", "LossOutput", "MultimodalBatch", "SequenceBuilder"]
