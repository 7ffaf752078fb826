"""The small models the bundled workloads train, written here (torchvision is not importable).

All are plain ``nn.Module`` classes with constructor arguments only, so ``functools.partial(Cls,
...)`` is a picklable ``model_fn`` for spawned workers.

* :class:`MLP`: one hidden layer; the digits workload. Widen ``hidden`` for more capacity.
* :class:`SmallCNN`: two 5x5 conv + pool stages and two linear layers, ~47k parameters at the
  default widths; MNIST and Fashion-MNIST. ``width`` scales the channels (2 -> 118k parameters),
  ``hidden`` the first linear layer (512 -> 281k parameters at about the same compute).
* :class:`ResNet18`: the CIFAR variant of ResNet-18 (3x3 stem, no max-pool, 10 classes,
  11,173,962 parameters); a realistic gradient size for throughput benchmarks.
"""

from __future__ import annotations

from torch import Tensor, nn


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed (non-trainable) per-feature statistics held as buffers.

    Putting it in the model rather than the data keeps the dataset in its natural units while the
    first layer sees centred, unit-scale inputs, which is what lets plain SGD converge quickly.
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Sequential):
    """[Standardize] -> Flatten -> Linear(in, hidden) -> ReLU -> Linear(hidden, out).

    Initialisation: He (Kaiming normal) for the ReLU layer, Glorot for the output, zero biases;
    with standardised inputs this reaches 95% on digits in about a third of the SGD steps that
    PyTorch's default initialisation on raw [0, 1] inputs needs.
    Pass ``mean``/``std`` (per-feature training statistics) to standardise inside the model.
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, out_features: int = 10,
                 mean: Tensor | None = None, std: Tensor | None = None) -> None:
        layers: list[nn.Module] = []
        if mean is not None and std is not None:
            layers.append(Standardize(mean, std))
        first, last = nn.Linear(in_features, hidden), nn.Linear(hidden, out_features)
        nn.init.kaiming_normal_(first.weight, nonlinearity="relu")
        nn.init.xavier_normal_(last.weight)
        nn.init.zeros_(first.bias)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, nn.Flatten(), first, nn.ReLU(), last)


class SmallCNN(nn.Module):
    """conv(1->16, 5x5) -> pool -> conv(16->32, 5x5) -> pool -> fc(512->64) -> fc(64->10).

    Expects (N, 1, 28, 28) inputs. ``width`` multiplies the channels (compute and parameters);
    ``hidden`` sets the first linear layer's width: parameters grow with it at almost no compute
    (512 -> ~281k parameters, 6x the default's, for ~the same backward time), the regime of
    communication-bound training that compression is for.
    """

    def __init__(self, num_classes: int = 10, width: int = 1, in_channels: int = 1,
                 hidden: int = 64) -> None:
        super().__init__()
        c1, c2 = 16 * width, 32 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 24 -> 12
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),  # 12 -> 8 -> 4
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, hidden),
                                        nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, four stages of two BasicBlocks, global average pool."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count (what a gradient exchange moves)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
