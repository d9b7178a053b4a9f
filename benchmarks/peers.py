"""transformers and timm as contenders of `bigtransfer.benchmark`: the same weights, built the way their users run
them (eager, channels_last, and timm compiled: for inference with and without inductor freezing, PyTorch's
documented setting for CPU inference, for training as timm's train script compiles), every one counted as a peer.

The weights go to timm through the library's own key map (`bigtransfer.checkpoints.to_timm`), and the logits of
both peers are checked against this package's before anything is timed. Used by benchmarks/bench_models.py.
"""

from __future__ import annotations

import torch
from torch import nn

from bigtransfer.benchmark import BenchConfig, Contender, Peers, inference_step, training_step
from bigtransfer.checkpoints import to_timm
from bigtransfer.config import ARCHITECTURES, BitConfig

TIMM_NAMES = {name: f"resnetv2_{name[1:].lower()}_bit" for name in ARCHITECTURES}  # R50x1 -> resnetv2_50x1_bit


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


class TransformersAndTimm(Peers):
    def __init__(self):
        self.transformers, self.timm = import_peers()

    def build(self, kind: str, weights: dict[str, torch.Tensor], variant: str) -> nn.Module:
        ours = BitConfig.from_variant(variant)
        if kind == "transformers":
            config = self.transformers.BitConfig(
                embedding_size=ours.embedding_size, hidden_sizes=list(ours.hidden_sizes), depths=list(ours.depths),
                width_factor=ours.width_factor, layer_type="preactivation", global_padding=None,
                num_groups=ours.num_groups, num_labels=ours.num_labels,
            )
            model = self.transformers.BitForImageClassification(config)
            model.load_state_dict(weights, strict=True)
        else:
            name = TIMM_NAMES[variant.split("-", 2)[-1]]
            model = self.timm.create_model(name, pretrained=False, num_classes=ours.num_labels)
            model.load_state_dict(to_timm(weights), strict=True)
        return model.eval()

    def parity(self, reference: nn.Module, weights: dict[str, torch.Tensor], variant: str) -> dict[str, float]:
        pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
        differences = {}
        with torch.no_grad():
            expected = reference(pixels).logits
            for kind in ("transformers", "timm"):
                output = self.build(kind, weights, variant)(pixels)
                logits = output if isinstance(output, torch.Tensor) else output.logits
                differences[kind] = (logits - expected).abs().max().item()
        differences["logit_scale"] = expected.abs().max().item()
        return differences

    def versions(self) -> dict[str, str]:
        return {"transformers": self.transformers.__version__, "timm": self.timm.__version__}

    def contenders(self, config: BenchConfig, spec, precision, weights) -> list[Contender]:
        device = torch.device(config.device)

        def make(kind: str, channels_last: bool):
            def build() -> nn.Module:
                model = self.build(kind, weights, config.variant).to(device)
                return model.to(memory_format=torch.channels_last) if channels_last else model

            return build

        if spec[2]:
            contenders = [
                Contender(f"{kind}{layout}", False, training_step(make(kind, bool(layout)), device, bool(layout)))
                for kind in ("transformers", "timm") for layout in ("", " channels_last")
            ]
            if config.compile:  # torch.compile(model) is how timm's own train script compiles (--torchcompile)
                contenders.append(Contender(
                    "timm channels_last compiled", False,
                    training_step(lambda: torch.compile(make("timm", True)()), device, True),
                    eager_form="timm channels_last"))
            return contenders
        contenders = [
            Contender(f"{kind}{layout}", False, inference_step(make(kind, bool(layout)), device, bool(layout)))
            for kind in ("transformers", "timm") for layout in ("", " channels_last")
        ]
        if config.compile:
            contenders += [
                Contender("timm channels_last compiled", False,
                          inference_step(make("timm", True), device, channels_last=True, compiled="default"),
                          eager_form="timm channels_last"),
                Contender("timm channels_last compiled+freezing", False,
                          inference_step(make("timm", True), device, channels_last=True, compiled="frozen"),
                          eager_form="timm channels_last"),
            ]
        return contenders
