"""GenConViT (Deressa et al. 2023) re-implemented: a conv autoencoder (ED) or VAE plus ConvNeXt and
Swin feature paths applied to the input and its reconstruction, concatenated into one classifier head.

Differences from the public code, on purpose: the latent is a small convolutional map instead of
flatten->Linear layers (those reach ~600M parameters at 224 px and fix the input size); the VAE uses
the textbook reparameterization ``mu + eps * exp(0.5 * logvar)`` and returns ``mu`` at eval; the
decoder output is linear (no final ReLU) so it can match normalized, partly negative inputs; the two
backbones are separate timm models chosen by name (``model.kwargs.convnext`` / ``model.kwargs.swin``).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from distrib.config import ConfigError, ModelConfig
from distrib.config.fields import closest_key
from distrib.models.registry import register_model
from distrib.models.timm_models import create_timm

# model.kwargs understood by genconvit_ed / genconvit_vae, with their defaults (the paper's full model).
DEFAULTS = dict(
    convnext="convnext_tiny",  # timm name of the ConvNeXt path
    swin="swin_tiny_patch4_window7_224",  # timm name of the Swin/attention path (gets img_size)
    convnext_kwargs={},  # extra timm kwargs for the ConvNeXt path (e.g. dims for a tiny debug net)
    swin_kwargs={},  # extra timm kwargs for the attention path (e.g. embed_dim, depths, num_heads)
    convnext_file="",  # local pretrained weights for the ConvNeXt path ('' = random init, or model.pretrained: hub)
    swin_file="",  # local pretrained weights for the attention path ('' = random init)
    enc_channels=None,  # encoder widths; default ED (16, 32, 64, 128, 256), VAE (16, 32, 64, 128)
    latent_channels=16,  # VAE latent channels at 1/16 resolution (ED uses the last encoder width)
    head_hidden=256,  # hidden width of the classification MLP
)


def _pooled_width(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


class _ConvEncoder(nn.Module):
    """ED encoder: conv3x3-ReLU-maxpool blocks, each halving the resolution (the paper's layout)."""

    def __init__(self, channels: list[int]):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class _VAEEncoder(nn.Module):
    """VAE encoder: stride-2 conv-BN-LeakyReLU blocks, then 1x1 convs to the latent mean and log-variance."""

    def __init__(self, channels: list[int], latent: int):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.LeakyReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.mu = nn.Conv2d(c_in, latent, 1)
        self.logvar = nn.Conv2d(c_in, latent, 1)

    def forward(self, x):
        h = self.features(x)
        return self.mu(h), self.logvar(h)


class _ConvDecoder(nn.Module):
    """Transposed-conv decoder mirroring the encoder; the last layer is linear (inputs are normalized)."""

    def __init__(self, c_latent: int, channels: list[int]):
        super().__init__()
        widths = list(reversed(channels[:-1])) + [3]
        layers, c_in = [], c_latent
        for i, c in enumerate(widths):
            layers.append(nn.ConvTranspose2d(c_in, c, 2, stride=2))
            if i < len(widths) - 1:
                layers.append(nn.ReLU(inplace=True))
            c_in = c
        self.features = nn.Sequential(*layers)

    def forward(self, z):
        return self.features(z)


class GenConViT(nn.Module):
    """GenConViT-ED (``variant='ed'``) or GenConViT-VAE (``variant='vae'``).

    ``forward(x)`` returns ``dict(logits, recon, mu, logvar, recon_error)``; ``mu``/``logvar`` are None
    for ED. The embedding is ``[convnext(x), swin(x), convnext(recon), swin(recon), mse mean/std/max]``.
    """

    def __init__(self, variant: str, num_classes: int, img_size: int, drop_rate: float = 0.0, **kw):
        super().__init__()
        if variant not in ("ed", "vae"):
            raise ConfigError(f"GenConViT variant must be 'ed' or 'vae', got {variant!r}")
        self.variant = variant
        self.img_size = img_size
        self.dynamic_size = bool(kw["swin_kwargs"].get("dynamic_img_size", False))
        default_ch = [16, 32, 64, 128, 256] if variant == "ed" else [16, 32, 64, 128]
        channels = list(kw["enc_channels"] or default_ch)
        self.downsample = 2 ** len(channels)
        if variant == "ed":
            self.encoder = _ConvEncoder(channels)
            self.decoder = _ConvDecoder(channels[-1], channels)
        else:
            self.encoder = _VAEEncoder(channels, kw["latent_channels"])
            self.decoder = _ConvDecoder(kw["latent_channels"], channels)
        hub = bool(kw.get("pretrained"))  # model.pretrained: each backbone from timm's hub cache unless a *_file
        self.convnext = create_timm(
            kw["convnext"],
            kw["convnext_file"],
            key="model.kwargs.convnext",
            pretrained=hub,
            num_classes=0,
            **kw["convnext_kwargs"],
        )
        self.swin = create_timm(
            kw["swin"],
            kw["swin_file"],
            key="model.kwargs.swin",
            pretrained=hub,
            num_classes=0,
            img_size=img_size,
            **kw["swin_kwargs"],
        )
        self.num_features = 2 * (_pooled_width(self.convnext) + _pooled_width(self.swin)) + 3
        self.head = nn.Sequential(
            nn.LayerNorm(self.num_features),  # backbone features and MSE statistics live on different scales
            nn.Linear(self.num_features, kw["head_hidden"]),
            nn.GELU(),
            nn.Dropout(drop_rate),
            nn.Linear(kw["head_hidden"], num_classes),
        )

    @property
    def pretrained_cfg(self) -> dict:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, input_size=(3, self.img_size, self.img_size))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reconstruct(self, x: torch.Tensor):
        """``(recon, mu, logvar)``; the VAE samples ``z`` in training and uses ``mu`` in eval."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size) and not self.dynamic_size:
            raise ConfigError(
                f"GenConViT was built for {self.img_size} px (model.img_size) but got a "
                f"{tuple(x.shape[-2:])} input; set model.img_size to data.img_size "
                "(the Swin path has a fixed token grid)"
            )
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ConfigError(
                f"GenConViT input {tuple(x.shape[-2:])} must be a multiple of {self.downsample} "
                "(encoder depth); change data.img_size or model.kwargs.enc_channels"
            )
        if self.variant == "ed":
            return self.decoder(self.encoder(x)), None, None
        mu, logvar = self.encoder(x)
        logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decoder(z), mu, logvar

    @staticmethod
    def recon_error_stats(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-sample squared-error mean, std and max: [B, 3]."""
        err = (recon - x).pow(2).flatten(1)
        return torch.stack([err.mean(1), err.std(1), err.amax(1)], dim=1)

    def _embed(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        # One backbone pass over input and reconstruction. ConvNeXt/Swin use LayerNorm, so batching the
        # two does not mix their statistics (a BatchNorm backbone here would, in training mode).
        both = torch.cat([x, recon], dim=0)
        c, s = self.convnext(both), self.swin(both)
        b = x.shape[0]
        return torch.cat([c[:b], s[:b], c[b:], s[b:], self.recon_error_stats(x, recon)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        recon, _, _ = self.reconstruct(x)
        return self._embed(x, recon)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> dict:
        recon, mu, logvar = self.reconstruct(x)
        feats = self._embed(x, recon)
        return dict(logits=self.head(feats), recon=recon, mu=mu, logvar=logvar, recon_error=feats[:, -3])


def _nest(kwargs: dict) -> dict:
    """Dotted overrides arrive flat ('swin_kwargs.embed_dim': 24); nest them under their parent key."""
    out: dict = {}
    for k, v in kwargs.items():
        parent, _, child = k.partition(".")
        if child:
            out[parent] = {**out.get(parent, {}), child: v}
        elif isinstance(v, dict):
            out[parent] = {**out.get(parent, {}), **v}
        else:
            out[parent] = v
    return out


def _build(model_cfg: ModelConfig, variant: str) -> GenConViT:
    kwargs = _nest(model_cfg.kwargs)
    unknown = sorted(set(kwargs) - set(DEFAULTS) - {"img_size"})
    if unknown:
        raise ConfigError(
            f"unknown model.kwargs {unknown} for {model_cfg.name}{closest_key(unknown[0], DEFAULTS)} "
            f"valid keys: {', '.join(DEFAULTS)}"
        )
    kw = {**DEFAULTS, **{k: v for k, v in kwargs.items() if k != "img_size"}}
    img_size = model_cfg.img_size or int(kwargs.get("img_size", 224))
    model = GenConViT(
        variant,
        model_cfg.num_classes,
        img_size,
        drop_rate=model_cfg.drop_rate,
        pretrained=model_cfg.pretrained and not model_cfg.pretrained_file,
        **kw,
    )
    if model_cfg.pretrained_file:
        _load_full_weights(model, model_cfg.pretrained_file)
    return model


def _load_full_weights(model: nn.Module, path: str) -> None:
    """Load a whole-GenConViT state dict (or a distrib best_model.pth holding one under 'state_dict')."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"pretrained weights file not found: {os.path.abspath(path)} (model.pretrained_file); "
            "point it at a saved GenConViT state dict, or set model.pretrained_file='' and use "
            "model.kwargs.convnext_file / swin_file for backbone weights"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{path} does not match this GenConViT configuration: {e}") from e


@register_model
def genconvit_ed(model_cfg: ModelConfig) -> GenConViT:
    """GenConViT with a convolutional autoencoder."""
    return _build(model_cfg, "ed")


@register_model
def genconvit_vae(model_cfg: ModelConfig) -> GenConViT:
    """GenConViT with a convolutional VAE (KL term in the loss via train.kl_weight)."""
    return _build(model_cfg, "vae")
