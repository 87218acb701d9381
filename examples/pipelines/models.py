"""The neural networks of the example pipelines: real architectures, seeded random weights.

No weights can be downloaded here, so the CNNs and the translation transformer are built
from a seed: every worker (and every Ray Serve replica) that builds one gets the very
same weights, so results are deterministic wherever a model runs. Their outputs mean
nothing; their cost is that of the architecture, which is what serving measures.

- `resnet`: a ResNet-18 (BasicBlock, [2, 2, 2, 2]) at half width, for 64x64 images;
- `inception`: an Inception-v1-style net (stem, three inception modules of 1x1, 3x3,
  double-3x3 and pool branches);
- `detector`: a YOLO-style single-shot detector (a Darknet-like backbone and a 1x1
  head giving objectness and class scores per cell of a 4x4 grid);
- `Seq2Seq`: an encoder-decoder transformer (torch.nn.Transformer, 2+2 layers,
  d_model 128) with greedy decoding.

Random weights alone make every image look alike to a CNN (activations collapse onto
their mean), so each CNN's batch-norm statistics are estimated once, at build, from
synthetic images of the same seed, as training would have set them; the last layer is
scaled so that confidences spread over (0, 1). Images are classified one at a time:
batched convolutions round differently with the batch size (by ~1e-6), and results
must not depend on which requests happened to share a call.

Each model runs on one thread (`one_thread`): a worker or replica is one core's worth.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

IMAGE = 64  # images are IMAGE x IMAGE x 3, uint8
CLASSES = 1000  # ImageNet-sized label space
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def one_thread() -> None:
    """Run torch and BLAS on one thread in this process (a worker is one core)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def to_tensor(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW normalized as for ImageNet models."""
    if not isinstance(image, np.ndarray) or image.shape != (IMAGE, IMAGE, 3):
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected a {IMAGE}x{IMAGE}x3 image, got {shape}")
    x = (image.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def synthetic_image(rng: np.random.Generator) -> np.ndarray:
    """A 64x64x3 uint8 image: a random coarse colour layout (a 4x4 grid of patches
    scaled by a random palette) plus pixel noise, so images differ in structure."""
    coarse = rng.random((4, 4, 3)) * rng.random(3)
    layout = np.kron(coarse, np.ones((IMAGE // 4, IMAGE // 4, 1)))
    return (layout * 200 + rng.random((IMAGE, IMAGE, 3)) * 55).astype(np.uint8)


def _settle(net: nn.Sequential, seed: int, temperature: float = 3.0) -> nn.Sequential:
    """Batch-norm statistics from 64 synthetic images; the last linear layer's weights
    redrawn so that its outputs have about `temperature` standard deviation."""
    one_thread()  # the same reduction order in every process that builds the model
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(np.stack([to_tensor(synthetic_image(rng)) for _ in range(64)]))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batch
    net.train()
    with torch.no_grad():
        net(images)
    last = net[-1]
    if isinstance(last, nn.Linear):
        nn.init.normal_(last.weight, std=temperature / last.in_features**0.5)
        nn.init.zeros_(last.bias)
    return net.eval()


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout, 3)
        )
        self.skip = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet(seed: int, classes: int = CLASSES, width: int = 32) -> nn.Module:
    """ResNet-18's layout ([2, 2, 2, 2] basic blocks) at `width` base channels."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [*_conv_bn(3, width, 7, 2), nn.ReLU(inplace=True)]
    layers.append(nn.MaxPool2d(3, 2, 1))
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(cin, cout, stride))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return _settle(nn.Sequential(*layers), seed)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated: 1x1, 1x1-3x3, 1x1-3x3-3x3, pool-1x1."""

    def __init__(self, cin: int, c1: int, c3: int, c5: int, cp: int) -> None:
        super().__init__()

        def unit(a: int, b: int, k: int) -> list[nn.Module]:
            return [*_conv_bn(a, b, k), nn.ReLU(inplace=True)]

        self.b1 = nn.Sequential(*unit(cin, c1, 1))
        self.b3 = nn.Sequential(*unit(cin, c3 // 2, 1), *unit(c3 // 2, c3, 3))
        self.b5 = nn.Sequential(*unit(cin, c5 // 2, 1), *unit(c5 // 2, c5, 3), *unit(c5, c5, 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), *unit(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


def inception(seed: int, classes: int = CLASSES, temperature: float = 5.0) -> nn.Module:
    """A GoogLeNet-style stem and three inception modules."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        *_conv_bn(3, 32, 3, 2), nn.ReLU(inplace=True),
        *_conv_bn(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        InceptionModule(64, 32, 64, 16, 16),
        InceptionModule(128, 64, 96, 32, 32),
        nn.MaxPool2d(3, 2, 1),
        InceptionModule(224, 96, 128, 32, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(288, classes),
    )  # fmt: skip
    return _settle(net, seed, temperature)


DETECTOR_GRID = 4
DETECTOR_CLASSES = ("person", "vehicle", "animal")


def detector(seed: int) -> nn.Module:
    """YOLO-style: conv-BN-leaky blocks with max-pooling down to a 4x4 grid, then a 1x1
    head with 1 objectness + len(DETECTOR_CLASSES) class scores per cell."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    cin = 3
    for cout in (16, 32, 64, 128):
        layers += [*_conv_bn(cin, cout, 3), nn.LeakyReLU(0.1, inplace=True), nn.MaxPool2d(2)]
        cin = cout
    layers += [*_conv_bn(cin, 256, 3), nn.LeakyReLU(0.1, inplace=True)]
    layers.append(nn.Conv2d(256, 1 + len(DETECTOR_CLASSES), 1))
    return _settle(nn.Sequential(*layers), seed)


@torch.inference_mode()
def classify(model: nn.Module, image: np.ndarray) -> tuple[int, float]:
    """(top label, its softmax probability) of one preprocessed 3xHxW image."""
    probs = torch.softmax(model(torch.from_numpy(image).unsqueeze(0))[0], dim=0)
    conf, label = probs.max(dim=0)
    return int(label), float(conf)


@torch.inference_mode()
def detect(model: nn.Module, image: np.ndarray) -> list[str]:
    """The class of each grid cell whose objectness is positive, for one image."""
    cells = model(torch.from_numpy(image).unsqueeze(0))[0].flatten(1)  # (1 + classes, 16)
    found = cells[0] > 0
    kinds = cells[1:].argmax(dim=0)
    return [DETECTOR_CLASSES[int(k)] for k, hit in zip(kinds, found) if hit]


# --- translation ------------------------------------------------------------------

VOCAB = 4096
PAD, BOS, EOS = 0, 1, 2
MAX_SOURCE = 32
MAX_TARGET = 24


def tokenize(text: str) -> list[int]:
    """Words to ids by hashing (no vocabulary file to download): stable across processes."""
    words = text.lower().split()[:MAX_SOURCE]
    return [3 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in words]


def detokenize(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


class Seq2Seq(nn.Module):
    """An encoder-decoder transformer (2 + 2 layers, d_model 128, 4 heads) with greedy
    decoding up to `max_len` tokens or EOS."""

    def __init__(self, seed: int, d_model: int = 128) -> None:
        super().__init__()
        one_thread()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Embedding(max(MAX_SOURCE, MAX_TARGET) + 1, d_model)
        self.transformer = nn.Transformer(
            d_model, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
            dim_feedforward=4 * d_model, dropout=0.0, batch_first=True,
        )  # fmt: skip
        self.out = nn.Linear(d_model, VOCAB)
        self.eval()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.embed(ids) + self.position(positions)

    @torch.inference_mode()
    def translate(self, source: list[int]) -> list[int]:
        """Greedy decoding: up to 3 tokens per 2 source tokens (2 to MAX_TARGET), or EOS."""
        if not source:
            return []
        src = torch.tensor([source])
        memory = self.transformer.encoder(self._embed(src))
        out = [BOS]
        for _ in range(min(MAX_TARGET, max(2, 3 * len(source) // 2))):
            tgt = torch.tensor([out])
            mask = self.transformer.generate_square_subsequent_mask(len(out))
            hidden = self.transformer.decoder(self._embed(tgt), memory, tgt_mask=mask)
            token = int(self.out(hidden[0, -1]).argmax())
            if token == EOS:
                break
            out.append(token)
        return out[1:]
