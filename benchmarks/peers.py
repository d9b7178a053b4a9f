"""transformers and timm as contenders of the bench (`bigtransfer.bench`), built the way their expert users run
them: channels_last; for inference compiled with inductor freezing (PyTorch's documented CPU-inference setting,
applied by the worker the documented way and verified), and compiled without it; for training compiled as timm's
train script does (`torch.compile(model)`). Every one counts as a peer.

Each contender is built in its own worker process from the same seeded weights (`bigtransfer.bench.reference_model`):
to timm through the library's own key map (`bigtransfer.checkpoints.to_timm`), to transformers as they are. The
logits of both are checked against this package's before anything is timed (`parity`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from bigtransfer.bench import (
    WORKLOADS,
    BenchConfig,
    Contender,
    inference_step,
    pixels,
    reference_model,
    training_step,
)
from bigtransfer.checkpoints import to_timm
from bigtransfer.config import ARCHITECTURES


def import_peers():
    """(transformers, timm), or ImportError naming what to install."""
    missing = []
    try:
        import transformers
    except ImportError:
        transformers, missing = None, missing + ["transformers"]
    try:
        import timm
    except ImportError:
        timm, missing = None, missing + ["timm"]
    if missing:
        raise ImportError(
            f"the peer comparison needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            "installed: pip install 'bigtransfer[dev]' (or pip install transformers timm torchvision)"
        )
    return transformers, timm


def peer_model(kind: str, variant: str) -> nn.Module:
    """transformers' or timm's BiT with the variant's reference weights: `timm.create_model("resnetv2_50x1_bit")`
    and its kin for the paper's variants; for `tiny`, timm's ResNetV2 built as those are, at tiny's widths."""
    transformers, timm = import_peers()
    reference = reference_model(variant)
    ours = reference.config
    if kind == "transformers":
        config = transformers.BitConfig(
            embedding_size=ours.embedding_size, hidden_sizes=list(ours.hidden_sizes), depths=list(ours.depths),
            width_factor=ours.width_factor, layer_type="preactivation", global_padding=None,
            num_groups=ours.num_groups, num_labels=ours.num_labels,
        )
        model = transformers.BitForImageClassification(config)
        model.load_state_dict(reference.state_dict(), strict=True)
    elif (architecture := variant.rsplit("-", 1)[-1]) in ARCHITECTURES:
        name = f"resnetv2_{architecture[1:].lower()}_bit"  # R50x1 -> resnetv2_50x1_bit
        model = timm.create_model(name, pretrained=False, num_classes=ours.num_labels)
        model.load_state_dict(to_timm(reference.state_dict()), strict=True)
    else:
        from timm.layers import GroupNormAct, StdConv2d
        from timm.models.resnetv2 import ResNetV2

        model = ResNetV2(
            layers=list(ours.depths), channels=tuple(ours.hidden_sizes), num_classes=ours.num_labels,
            width_factor=ours.width_factor, stem_chs=ours.embedding_size // ours.width_factor, stem_type="fixed",
            conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=ours.num_groups),
        )
        model.load_state_dict(to_timm(reference.state_dict()), strict=True)
    return model.eval()


def peer(kind: str, channels_last: bool, compiled: bool, workload: str, precision: str, variant: str, device: str):
    """A worker's factory: one step of transformers' or timm's model (inference, or the training step)."""
    model = peer_model(kind, variant).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if WORKLOADS[workload][2]:
        return training_step(torch.compile(model) if compiled else model, workload, precision, device, channels_last)
    return inference_step(model, pixels(workload, device, channels_last), precision, compiled=compiled)


def peer_contenders(config: BenchConfig, workload: str, precision: str) -> list[Contender]:
    """transformers and timm, eager in both layouts; compiled in channels_last (inference: frozen, and timm also
    unfrozen)."""
    common = dict(workload=workload, precision=precision, variant=config.variant, device=config.device)

    def contender(name: str, kind: str, channels_last: bool, compiled: bool = False, frozen: bool = False):
        return Contender(name, peer, dict(common, kind=kind, channels_last=channels_last, compiled=compiled),
                         ours=False, frozen=frozen)

    eager = [contender(f"{kind}{' channels_last' * layout}", kind, layout)
             for kind in ("transformers", "timm") for layout in (False, True)]
    if not config.compile:
        return eager
    if WORKLOADS[workload][2]:
        return eager + [contender(f"{kind} channels_last compiled", kind, True, True) for kind in ("transformers", "timm")]
    return eager + [contender("timm channels_last compiled", "timm", True, True)] + [
        contender(f"{kind} channels_last compiled+frozen", kind, True, True, frozen=True)
        for kind in ("transformers", "timm")]


def parity(variant: str) -> dict[str, float]:
    """Max |difference| of each peer's logits from this package's on the same weights, and the logits' scale."""
    reference = reference_model(variant)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    differences = {}
    with torch.no_grad():
        expected = reference(x).logits
        for kind in ("transformers", "timm"):
            output = peer_model(kind, variant)(x)
            logits = output if isinstance(output, torch.Tensor) else output.logits
            differences[kind] = (logits - expected).abs().max().item()
    return differences | {"logit_scale": expected.abs().max().item()}


def versions() -> dict[str, str]:
    transformers, timm = import_peers()
    return {"transformers": transformers.__version__, "timm": timm.__version__}
