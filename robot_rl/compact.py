"""Compact inference copies of networks, for Q-gating on the actor's CPU.

At the image config's sizes one gating step reads ~62 MB of float32 weights (the 10 critics of [1024, 1024] alone are
48 MB), and at batch 1 a matrix-vector product runs at memory speed: the step is bound by reading weights, not by
arithmetic. `compact_copy(module)` returns a frozen copy that reads a quarter of the bytes:

- every large `nn.Linear` and `EnsembleLinear` keeps its weights as int8 with one float scale per output channel
  (symmetric, weight-only: activations stay floating point, bf16 inside the product, float32 outside);
- every camera CNN (`CameraEncoders.convs`) runs in bf16, which the CPU's AMX/AVX-512 units execute at twice the speed;
- everything else (normalisers, LayerNorms, heads of a few outputs, distributions) stays float32.

Outputs are float32 and agree with the original to about 1% of their scale (tests/test_compact.py measures it).
The copy is for acting only: it has no gradients, and it does not follow later changes of the original's weights.

The int8 product is torch's weight-only int8 kernel (`torch._weight_int8pack_mm`, the one torchao's int8 weight-only
mode calls on CPU). Where it is missing or refuses the device, the layer multiplies by its dequantised weights instead:
same values, without the speed.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.config import EncoderConfig
from robot_rl.networks import CameraEncoders, EnsembleLinear, ObsEncoder

# Linear layers with fewer weights than this stay float32: their time is the call, not the bytes.
MIN_INT8_WEIGHTS = 32 * 1024
# The int8 kernel is fastest when the input width is a multiple of this; narrower inputs are zero-padded.
K_ALIGN = 32


@functools.cache
def _int8_kernel_works(device_type: str) -> bool:
    """Whether torch's weight-only int8 kernel runs here and computes what it should (checked once per device type)."""
    if device_type != "cpu" or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, K_ALIGN, dtype=torch.bfloat16)
        w = torch.ones(4, K_ALIGN, dtype=torch.int8)
        out = torch._weight_int8pack_mm(x, w, torch.ones(4, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(out.float(), torch.full((1, 4), float(K_ALIGN))))


def quantize_rows(weight: torch.Tensor, *, align: int = K_ALIGN) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of a [..., out, in] weight per output row: (int8 [..., out, in padded to `align`],
    contiguous; scales [..., out] float32) with weight ~= int8 * scale. A row of zeros gets scale 1 (and stays zeros).
    A transposed view is fine: only the int8 result is copied into row-major order."""
    if weight.ndim < 2:
        raise ValueError(f"expected a [..., out, in] weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scales = w.abs().amax(dim=-1) / 127.0  # NaN or inf anywhere in a row shows in its scale
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("cannot quantise a weight that holds NaN or inf")
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    pad = (-w.shape[-1]) % align
    if pad:
        q = F.pad(q, (0, pad))
    return q.contiguous(), scales


class _Int8Rows(nn.Module):
    """y = x @ W.T for a row-quantised W [out, in]; x [B, in] any float dtype -> y [B, out] float32 (no bias).

    weight: [out, in], or [E, out, in] (an ensemble's members, stacked into E * out rows)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scales = quantize_rows(weight)
        q, scales = q.reshape(-1, q.shape[-1]), scales.reshape(-1)
        self.in_dim = int(weight.shape[-1])
        self.fast = _int8_kernel_works(weight.device.type)
        if self.fast:
            self.register_buffer("q", q)
            self.register_buffer("scales", scales.to(torch.bfloat16))
        else:  # the same values as float32 weights, dequantised once
            self.register_buffer("dequantised", q[:, : self.in_dim].float() * scales[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 2 and x.shape[1] == self.in_dim, (x.shape, self.in_dim)
        return self.product(self.prepare(x), slice(None)).float()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] as `product` takes it: bf16, zero-padded to the quantised width (float32 without the kernel)."""
        if not self.fast:
            return x.float()
        pad = self.q.shape[1] - self.in_dim
        return (F.pad(x.to(torch.bfloat16), (0, pad)) if pad else x.to(torch.bfloat16)).contiguous()

    def product(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """prepare(x) [B, .] times the weight's `rows` (all, or one ensemble member's); bf16 out with the kernel,
        float32 without."""
        if not self.fast:
            return F.linear(x, self.dequantised[rows])
        return torch._weight_int8pack_mm(x, self.q[rows], self.scales[rows])


class Int8Linear(nn.Module):
    """An nn.Linear with int8 weights (one scale per output), float32 in and out."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.rows = _Int8Rows(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.rows(x.reshape(-1, x.shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])


class Int8EnsembleLinear(nn.Module):
    """An EnsembleLinear with int8 weights: x [E, B, in] -> [E, B, out] float32.

    When every member reads the same input (the critics' first layer: one observation-action pair expanded over the
    ensemble), all members run as one product with their weights stacked; otherwise one product per member.
    """

    def __init__(self, layer: EnsembleLinear) -> None:
        super().__init__()
        weight = layer.weight.detach()  # [E, in, out]
        self.members, _, self.out_dim = weight.shape
        self.stacked = _Int8Rows(weight.transpose(1, 2))  # [E, out, in]: E * out rows
        self.bias = nn.Parameter(layer.bias.detach().float().clone(), False)  # [E, 1, out]

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        if members is not None:
            raise ValueError("a compact ensemble runs every member (acting never subsamples the ensemble)")
        assert x.ndim == 3 and x.shape[0] == self.members, (x.shape, self.members)
        e, b = self.members, x.shape[1]
        if x.stride(0) == 0 or e == 1:  # one shared input
            y = self.stacked(x[0]).reshape(b, e, self.out_dim).transpose(0, 1)
        else:
            rows, n = self.stacked, self.out_dim
            x = rows.prepare(x)  # converted once for all members
            y = torch.stack([rows.product(x[k], slice(k * n, (k + 1) * n)) for k in range(e)])
            y = y.float()
        return y + self.bias


class Bf16Convs(nn.Module):
    """A conv stack run in bf16 (channels-last kept): float32 in, float32 out."""

    def __init__(self, convs: nn.Sequential) -> None:
        super().__init__()
        self.convs = copy.deepcopy(convs).to(torch.bfloat16).to(memory_format=torch.channels_last)
        for layer in self.convs:
            if isinstance(layer, nn.ReLU):
                layer.inplace = True  # on the conv's fresh output: one pass less per layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x.to(torch.bfloat16)).float()


def compact_copy(module: nn.Module) -> nn.Module:
    """A frozen, compact copy of `module` for inference on CPU (see the module docstring); `module` is unchanged.

    Modules on another device than the CPU are copied unchanged (frozen): the compact kernels are CPU kernels.
    """
    params = list(module.parameters())
    memo: dict[int, nn.Module] = {}
    if not params or params[0].device.type == "cpu":
        # The compact layers enter the copy through deepcopy's memo: the weights they replace are never copied.
        memo = {id(child): compact for child, compact in _compact_layers(module)}
    return copy.deepcopy(module, memo).eval().requires_grad_(False)


def _compact_layers(module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, its compact replacement) for every layer of `module` (itself included) that has one."""
    out: list[tuple[nn.Module, nn.Module]] = []
    for layer in module.modules():
        if isinstance(layer, CameraEncoders):
            out.append((layer.convs, Bf16Convs(layer.convs)))
        elif isinstance(layer, nn.Linear) and layer.weight.numel() >= MIN_INT8_WEIGHTS:
            out.append((layer, Int8Linear(layer)))
        elif isinstance(layer, EnsembleLinear) and layer.weight[0].numel() >= MIN_INT8_WEIGHTS:
            out.append((layer, Int8EnsembleLinear(layer)))
    return out


class JointEncoder(nn.Module):
    """Two observation encoders of the same architecture run as one (compact): obs -> (features_a, features_b).

    Gating encodes the same images with the critics' encoder and the BC policy's. With equal conv stacks the two
    become one grouped stack with twice the groups (each group still its own camera's weights), so each layer is one
    kernel call for both: ~0.35 ms less per step than two stacks at the image config's sizes. `joint_encoder` says
    whether two encoders can be joined.
    """

    def __init__(self, a: ObsEncoder, b: ObsEncoder) -> None:
        super().__init__()
        self.a_normalizer = copy.deepcopy(a.normalizer)
        self.b_normalizer = copy.deepcopy(b.normalizer)
        self.state_keys = list(a.state_keys)
        self.counts = [len(group.names) for group in a.cameras]
        self.groups = nn.ModuleList(
            compact_copy(_joined_cameras(ga, gb)) for ga, gb in zip(a.cameras, b.cameras, strict=True)
        )

    def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        parts_a: list[torch.Tensor] = []
        parts_b: list[torch.Tensor] = []
        if self.a_normalizer is not None:
            state = torch.cat([obs[k].reshape(obs[k].shape[0], -1) for k in self.state_keys], dim=-1)
            parts_a.append(self.a_normalizer(state))
            parts_b.append(self.b_normalizer(state))
        for group, n in zip(self.groups, self.counts, strict=True):
            features = group(obs)  # [B, 2n * feature_dim]: a's cameras, then b's
            half = n * group.feature_dim
            parts_a.append(features[:, :half])
            parts_b.append(features[:, half:])
        return torch.cat(parts_a, dim=-1), torch.cat(parts_b, dim=-1)


def joint_encoder(a: ObsEncoder, b: ObsEncoder) -> JointEncoder | None:
    """A compact JointEncoder of `a` and `b`, or None when they differ in architecture (state keys, cameras, conv
    and trunk shapes), have no cameras, or live off the CPU."""
    if not a.cameras or a.state_keys != b.state_keys or len(a.cameras) != len(b.cameras):
        return None
    if (a.normalizer is None) != (b.normalizer is None) or next(a.parameters()).device.type != "cpu":
        return None
    for ga, gb in zip(a.cameras, b.cameras, strict=True):
        shapes_a = [tuple(p.shape) for p in ga.parameters()]
        if ga.names != gb.names or shapes_a != [tuple(p.shape) for p in gb.parameters()]:
            return None
    return JointEncoder(a, b)


def _joined_cameras(a: CameraEncoders, b: CameraEncoders) -> CameraEncoders:
    """One float CameraEncoders over a's cameras then b's (names repeated), holding both sets of weights."""
    n = len(a.names)
    cfg = EncoderConfig(
        channels=[conv.out_channels // n for conv in a.convs if isinstance(conv, nn.Conv2d)],
        feature_dim=a.feature_dim,
    )
    image = a.image_size
    joined = CameraEncoders([*a.names, *b.names], image[0], image[1], cfg)
    with torch.no_grad():
        for target, ca, cb in zip(joined.convs, a.convs, b.convs, strict=True):
            if isinstance(target, nn.Conv2d):  # groups are blocks of output channels: a's n groups, then b's
                target.weight.copy_(torch.cat([ca.weight, cb.weight]))
                target.bias.copy_(torch.cat([ca.bias, cb.bias]))
        for target, la, lb in ((joined.trunk, a.trunk, b.trunk), (joined.norm, a.norm, b.norm)):
            target.weight.copy_(torch.cat([la.weight, lb.weight]))  # members: a's cameras, then b's
            target.bias.copy_(torch.cat([la.bias, lb.bias]))
    return joined
