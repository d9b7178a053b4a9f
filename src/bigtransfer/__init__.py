"""bigtransfer: Big Transfer (BiT) models, checkpoints and the BiT-HyperRule."""

from .config import VARIANTS, BitConfig
from .convert import convert_checkpoint, load_checkpoint
from .errors import CheckpointError, UnsafeCheckpointError
from .export import ExportReport, export
from .fewshot import FewShotReport, fewshot
from .inference import OptimizedModel, optimize, predict_images, prepare_for_training
from .modeling import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    BitBackbone,
    BitForImageClassification,
    BitModel,
    BitPreTrainedModel,
    ImageClassifierOutputWithNoAttention,
)
from .processing import BitImageProcessor
from .quantize import QuantizeReport, quantize

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "BackboneOutput",
    "BaseModelOutputWithPoolingAndNoAttention",
    "BitBackbone",
    "BitConfig",
    "BitForImageClassification",
    "BitImageProcessor",
    "BitModel",
    "BitPreTrainedModel",
    "CheckpointError",
    "ExportReport",
    "FewShotReport",
    "ImageClassifierOutputWithNoAttention",
    "OptimizedModel",
    "QuantizeReport",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "export",
    "fewshot",
    "load_checkpoint",
    "optimize",
    "predict_images",
    "prepare_for_training",
    "quantize",
]
