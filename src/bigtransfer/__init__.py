"""bigtransfer: Big Transfer (BiT) models, checkpoints and the BiT-HyperRule."""

from .checkpoints import convert_checkpoint, load_checkpoint
from .config import VARIANTS, BitConfig
from .errors import CheckpointError, UnsafeCheckpointError
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
    "ImageClassifierOutputWithNoAttention",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "load_checkpoint",
]
