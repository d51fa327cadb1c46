"""Degradation-guided LoRA (S3Diff, paper Sec. 3.2): degradation scores -> per-block r x r
modulation matrices that sit between each LoRA's A and B projections.

The modulation is attached to peft's own LoRA layers with a forward hook on `lora_A`, registered
once when the model is built: peft computes `base(x) + scaling * B(A(x))`, and the hook turns
`A(x)` into `einsum(A(x), M)`, which is exactly the reference forward
`base(x) + scaling * B(einsum(A(x), M))` without re-binding any `forward`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


def _is_channels_last(tensor: torch.Tensor) -> bool:
    """NHWC and not also plain contiguous (a 1x1 spatial tensor is both; treat it as NCHW)."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def fourier_features(scores: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """(B,2) scores -> (B, 4*len(w)): [sin, cos] of 2*pi*score*w for blur, then for noise."""
    phase = scores.float()[..., None] * frequencies.float() * (2 * math.pi)
    per_score = torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)  # (B, 2, 2F)
    return per_score.flatten(1)


class ModulationHead(nn.Module):
    """de_mlp, block_mlp, fuse_mlp and the block-embedding table of one network (VAE or UNet).

    Submodule layouts match the released state dicts: de/block MLPs are `Sequential(Linear, ReLU)`
    (keys `0.weight`), fuse is a bare `Linear` (keys `weight`).
    """

    def __init__(self, rank: int, num_blocks: int, fourier_size: int = 64, embed_size: int = 256):
        super().__init__()
        self.rank = rank
        self.de_mlp = nn.Sequential(nn.Linear(4 * fourier_size, embed_size), nn.ReLU(inplace=True))
        self.block_mlp = nn.Sequential(nn.Linear(fourier_size, fourier_size), nn.ReLU(inplace=True))
        self.fuse_mlp = nn.Linear(embed_size + fourier_size, rank * rank)
        self.block_embeddings = nn.Embedding(num_blocks, fourier_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 4F) Fourier features -> (B, num_blocks, r, r) modulation matrices."""
        degradation_embed = self.de_mlp(features)
        block_embed = self.block_mlp(self.block_embeddings.weight)
        batch, blocks = features.shape[0], block_embed.shape[0]
        fused = torch.cat(
            [degradation_embed[:, None].expand(batch, blocks, -1), block_embed[None].expand(batch, blocks, -1)],
            dim=-1,
        )
        return self.fuse_mlp(fused).reshape(batch, blocks, self.rank, self.rank)


def _block_id(parts: list[str], other: int, up_offset: int | None = None) -> int:
    """down_blocks.i -> i, mid_block -> 4, up_blocks.i -> up_offset+i (when counted), else `other`."""
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks" and up_offset is not None:
        return up_offset + int(parts[1])
    return other


def unet_block_id(layer_name: str) -> int:
    """down_blocks.i -> i, mid_block -> 4, up_blocks.i -> 5+i, anything else -> 9."""
    return _block_id(layer_name.split("."), other=9, up_offset=5)


def vae_block_id(layer_name: str) -> int:
    """encoder.down_blocks.i -> i, encoder.mid_block -> 4, anything else -> 5."""
    return _block_id(layer_name.split(".")[1:], other=5)


@dataclass
class ModulatedLayer:
    name: str
    layer: LoraLayer
    block_id: int


class ModulationSlot:
    """Holds the current (B, blocks, r, r) modulation of one network and applies it in the hooks.

    Only the network calls of S3DiffModel (`encoder_call`, `unet_call`), the compiled call
    boundary, put a modulation here; they take it as an argument, so inside a compiled call it is
    a graph input, not state captured at trace time, and one graph serves every modulation
    (model/compiled.py). Everything else passes modulations explicitly. Its batch axis must match
    the batch that flows through the network.
    """

    def __init__(self, network: nn.Module, adapter: str, block_of: Callable[[str], int]):
        self.adapter = adapter
        self.modulation: torch.Tensor | None = None
        self.layers = [
            ModulatedLayer(name, module, block_of(name))
            for name, module in network.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A
        ]
        for entry in self.layers:
            entry.layer.lora_A[adapter].register_forward_hook(self._make_hook(entry.block_id))

    def _make_hook(self, block_id: int):
        def modulate(_module: nn.Module, _inputs, lora_a_out: torch.Tensor) -> torch.Tensor:
            if self.modulation is None:
                raise RuntimeError("degradation modulation not set before the forward pass")
            matrix = self.modulation[:, block_id]  # (B, r, r), kept in fp32
            # fp32 einsum: the modulated rank space overflows fp16 on real weights.
            if lora_a_out.dim() == 4 and _is_channels_last(lora_a_out):
                # the same contraction on the NHWC view, so the result stays NHWC for lora_B
                # (einsum would hand back NCHW and force a layout change per layer)
                out = (lora_a_out.float().permute(0, 2, 3, 1) @ matrix[:, None]).permute(0, 3, 1, 2)
            elif lora_a_out.dim() == 4:  # conv: contract the channel axis
                out = torch.einsum("bkhw,bkr->brhw", lora_a_out.float(), matrix)
            else:  # linear: contract the last axis
                out = torch.einsum("b...k,bkr->b...r", lora_a_out.float(), matrix)
            return out.to(lora_a_out.dtype)

        return modulate

    @contextlib.contextmanager
    def folded(self, modulation: torch.Tensor) -> Iterator[None]:
        """Run with the LoRA modulated by `modulation` (B, blocks, r, r) folded into the base
        weights (valid when every sample of the batch shares one modulation: its first is used):
        W' = W + s * B M^T A, adapters off.

        Why: at image resolution the LoRA branch is a second conv pass plus an einsum over a
        full-size activation (about 30% of the VAE encode); folding costs one small matmul per layer.
        """
        originals = []
        try:
            for entry in self.layers:
                layer = entry.layer
                base = layer.get_base_layer()
                weight_a = layer.lora_A[self.adapter].weight.float()
                weight_b = layer.lora_B[self.adapter].weight.float()
                matrix = modulation[0, entry.block_id]
                delta = weight_b.flatten(1) @ matrix.T @ weight_a.flatten(1)
                delta = delta.reshape(base.weight.shape) * layer.scaling[self.adapter]
                originals.append((layer, base, base.weight))
                folded = (base.weight.float() + delta).to(base.weight.dtype)
                if base.weight.dim() == 4 and _is_channels_last(base.weight):
                    folded = folded.contiguous(memory_format=torch.channels_last)
                base.weight = nn.Parameter(folded, requires_grad=False)
                layer._disable_adapters = True  # peft's flag; its public toggle also flips requires_grad
            yield
        finally:
            for layer, base, weight in originals:
                base.weight = weight
                layer._disable_adapters = False
