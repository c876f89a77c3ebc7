"""Keyword-spotting classifiers on raw waveforms: N×T float clips in [-1, 1] → logits.

Each model holds its front end (:mod:`torchpurify.features`), so audio triggers act on the
waveform and every defense sees one ordinary module. Features are standardised inside the model
by a BatchNorm over the mel or MFCC bins (``norm``, without affine parameters), so audio models
take no dataset mean/std. The 2-D models read the features as one-channel N×1×frames×bins maps
(time × frequency, as in the papers). ``input_shape`` is ``(T,)``; ``sample_rate`` sets the
25 ms / 10 ms framing of the front end.

Each docstring says what a neuron is: the module ``default_neuron_layer`` picks and its channels.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from torchpurify.errors import check
from torchpurify.features import MFCC, LogMel
from torchpurify.models.registry import MODELS

FRONT_ENDS = ("log-mel", "mfcc")


def clip_length(name: str, input_shape, sample_rate: int, minimum: int) -> int:
    """T from ``input_shape == (T,)``; a UserError for other shapes or clips under ``minimum``."""
    shape = tuple(input_shape)
    check(
        len(shape) == 1,
        f"{name} takes waveforms: input_shape must be (T,) samples, got {shape}",
    )
    check(sample_rate > 0, f"sample_rate must be a positive number of Hz, got {sample_rate}")
    check(
        shape[0] >= minimum,
        f"{name} needs clips of at least {minimum} samples ({minimum / sample_rate:.3f} s at "
        f"{sample_rate} Hz), got input_shape {shape}",
    )
    return shape[0]


def make_front_end(kind: str, sample_rate: int, n_mels: int = 40, n_mfcc: int = 40) -> nn.Module:
    """A log-mel or MFCC front end with 25 ms windows every 10 ms at ``sample_rate``."""
    check(kind in FRONT_ENDS, f"front_end must be one of {', '.join(FRONT_ENDS)}, got {kind!r}")
    win_length = round(0.025 * sample_rate)
    framing = {
        "sample_rate": sample_rate,
        "n_fft": 1 << (win_length - 1).bit_length(),  # the power of two ≥ the window
        "win_length": win_length,
        "hop_length": round(0.010 * sample_rate),
        "n_mels": n_mels,
    }
    return LogMel(**framing) if kind == "log-mel" else MFCC(**framing, n_mfcc=n_mfcc)


def spectral_minimum(sample_rate: int, frames: int) -> int:
    """The fewest samples giving ``frames`` frames (and enough for the STFT's reflect padding)."""
    hop, n_fft = round(0.010 * sample_rate), 1 << (round(0.025 * sample_rate) - 1).bit_length()
    return max((frames - 1) * hop, n_fft // 2 + 1)


def bins(front_end: nn.Module) -> int:
    """How many bins per frame a front end outputs (the BatchNorm's and the map's width)."""
    return front_end.n_mfcc if isinstance(front_end, MFCC) else front_end.n_mels


def time_frequency_map(features: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """N×bins×frames → N×1×frames×bins, in channels_last layout when the model prefers it.

    ``train.fit`` converts only 4-D inputs, never waveforms, so a 2-D audio model applies its
    ``channels_last`` preference here; convolutions then keep the layout of their input.
    """
    x = features.transpose(1, 2).unsqueeze(1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=layout)


class SpectralModel(nn.Module):
    """Base of the models on a log-mel or MFCC front end: checks the clip length, builds the
    front end and the BatchNorm that standardises its bins (``front_end`` and ``norm``, first
    in every such model). ``min_frames`` is the fewest frames the layers after it accept."""

    # The 2-D models train 1.5× faster on one CPU thread (benchmarks/audio_throughput.py).
    channels_last = True

    def __init__(
        self, name: str, input_shape, sample_rate: int, front_end: str, min_frames: int,
        n_mfcc: int = 40,
    ) -> None:  # fmt: skip
        super().__init__()
        clip_length(name, input_shape, sample_rate, spectral_minimum(sample_rate, min_frames))
        self.front_end = make_front_end(front_end, sample_rate, n_mfcc=n_mfcc)
        self.norm = nn.BatchNorm1d(bins(self.front_end), affine=False)

    @property
    def bins(self) -> int:
        return bins(self.front_end)

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Waveforms N×T → standardised features N×bins×frames."""
        return self.norm(self.front_end(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Waveforms N×T → the N×1×frames×bins map the 2-D models convolve."""
        return time_frequency_map(self.standardised(x), self.channels_last)


def conv_bn_relu(cin: int, cout: int, kernel=3, stride=1, padding=1, groups=1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def conv_pool_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class KWSCNN(SpectralModel):
    """A small 2-D CNN on 40 log-mel bins: the fast workhorse for audio experiments.

    Four 3×3 conv blocks (``width``, 2×, 4×, 8× channels): the first three are conv, 2×2
    max-pooling, BN, ReLU (pooling first does the memory-bound BN and ReLU work on a quarter of
    the positions, 1.2× faster training on one CPU thread), the last conv, BN, ReLU; then global
    average pooling and a linear classifier. About 0.1M parameters for ``width=16``. A neuron is
    one of the 128 channels of ``block4.2`` (the last ReLU), a map of 12 frames × 5 bins for a
    1-s clip.
    """

    def __init__(
        self,
        input_shape,
        num_classes,
        sample_rate: int = 16000,
        front_end: str = "log-mel",
        width: int = 16,
    ) -> None:
        super().__init__("kws-cnn", input_shape, sample_rate, front_end, min_frames=8)
        self.block1 = conv_pool_bn_relu(1, width)
        self.block2 = conv_pool_bn_relu(width, 2 * width)
        self.block3 = conv_pool_bn_relu(2 * width, 4 * width)
        self.block4 = conv_bn_relu(4 * width, 8 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_map(x)
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


class ResBlock(nn.Module):
    """Tang & Lin's residual block: (conv → ReLU → BN) twice, the identity added before the last
    BN. The BNs have no affine parameters, as in the authors' code (Honk)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, affine=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(torch.relu(self.conv1(x)))
        return self.bn2(torch.relu(self.conv2(out)) + x)


class Res8(SpectralModel):
    """res8 (Tang & Lin 2018, "Deep residual learning for small-footprint keyword spotting").

    A 3×3 conv to 45 channels, ReLU, 4×3 (time × frequency) average pooling, three residual
    blocks without dilation, global average pooling, linear; about 110k parameters, on 40 MFCCs
    as in the paper. A neuron is one of the 45 channels of ``blocks.2.bn2`` (the last block's
    output, after the residual sum), a map of 25 frames × 13 bins for a 1-s clip.
    """

    def __init__(
        self,
        input_shape,
        num_classes,
        sample_rate: int = 16000,
        front_end: str = "mfcc",
        channels: int = 45,
    ) -> None:
        super().__init__("res8", input_shape, sample_rate, front_end, min_frames=8)
        self.conv0 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.pool0 = nn.AvgPool2d((4, 3))
        self.blocks = nn.Sequential(*(ResBlock(channels) for _ in range(3)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_map(x)
        x = self.blocks(self.pool0(self.relu(self.conv0(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


class DSCNN(SpectralModel):
    """DS-CNN small (Zhang et al. 2017, "Hello Edge"), on 10 MFCCs as in the paper.

    A 10×4 (time × frequency) conv with stride 2 to 64 channels, then four depthwise-separable
    blocks (3×3 depthwise conv, 1×1 pointwise conv, each followed by BN + ReLU), global average
    pooling, linear; about 23k parameters. A neuron is one of the 64 channels of
    ``blocks.3.pointwise.2`` (the last pointwise ReLU), a map of 51 frames × 5 bins for a 1-s
    clip.
    """

    def __init__(
        self,
        input_shape,
        num_classes,
        sample_rate: int = 16000,
        front_end: str = "mfcc",
        n_mfcc: int = 10,
        channels: int = 64,
    ) -> None:
        super().__init__("ds-cnn", input_shape, sample_rate, front_end, min_frames=2, n_mfcc=n_mfcc)
        # Padding (5, 1) gives TensorFlow's "SAME" output size for stride 2, as in the paper.
        self.conv = conv_bn_relu(1, channels, (10, 4), stride=2, padding=(5, 1))
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    OrderedDict(
                        depthwise=conv_bn_relu(channels, channels, groups=channels),
                        pointwise=conv_bn_relu(channels, channels, kernel=1, padding=0),
                    )
                )
                for _ in range(4)
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv(self.feature_map(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


class LSTMClassifier(SpectralModel):
    """A one-layer LSTM over 40 log-mel frames with attention pooling over time.

    A linear layer scores each frame's hidden state; the softmax of the scores over time weights
    the hidden states into one N×``hidden`` vector; a Linear + ReLU (``features``) turns it into
    the feature vector the linear classifier reads. A neuron is one unit of that vector
    (``features.1``, N×``hidden``), made by ``features.0``: like a conv channel, it has weights
    for gradient norms, salience and regularisation, and a mask removes it from the decision.
    """

    channels_last = False  # no 2-D convolutions

    def __init__(
        self,
        input_shape,
        num_classes,
        sample_rate: int = 16000,
        front_end: str = "log-mel",
        hidden: int = 128,
    ) -> None:
        super().__init__("lstm", input_shape, sample_rate, front_end, min_frames=2)
        check(hidden >= 1, f"hidden must be a positive number of units, got {hidden}")
        self.lstm = nn.LSTM(self.bins, hidden, batch_first=True)
        self.attention = nn.Linear(hidden, 1)
        self.features = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.standardised(x).transpose(1, 2))  # N × frames × hidden
        weights = torch.softmax(self.attention(states), dim=1)
        return self.classifier(self.features((weights * states).sum(1)))


class M5(nn.Module):
    """M5 (Dai et al. 2017, "Very deep convolutional neural networks for raw waveforms").

    On the raw waveform: a 1-D conv of length 80 with stride 4 to 128 channels, then three
    length-3 convs to 128, 256 and 512 channels; each conv is followed by BN, ReLU and 4× max
    pooling; global average pooling, linear; about 0.56M parameters. The BN after the first
    conv standardises the input scale. A neuron is one of the 512 channels of ``blocks.3.3``
    (the last max-pool, the final feature map before global pooling: 15 steps for a 1-s clip at
    16 kHz). ``sample_rate`` only words the minimum-length message: the layers are in samples.
    """

    channels_last = False  # 1-D convolutions have no channels_last layout

    def __init__(self, input_shape, num_classes, sample_rate: int = 16000) -> None:
        super().__init__()
        # Four 4× poolings after the stride-4 conv need at least 4**4 conv outputs.
        clip_length("m5", input_shape, sample_rate, 80 + 4 * (4**4 - 1))
        widths = (128, 128, 256, 512)
        layers, cin = [], 1
        for i, cout in enumerate(widths):
            conv = (
                nn.Conv1d(cin, cout, 80, stride=4, bias=False)
                if i == 0
                else nn.Conv1d(cin, cout, 3, padding=1, bias=False)
            )
            layers.append(
                nn.Sequential(conv, nn.BatchNorm1d(cout), nn.ReLU(inplace=True), nn.MaxPool1d(4))
            )
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x.unsqueeze(1))
        return self.classifier(torch.flatten(self.pool(x), 1))


MODELS.register("kws-cnn", "4-conv CNN on log-mel, ~0.1M parameters (fast on CPU)")(KWSCNN)
MODELS.register("res8", "Tang & Lin res8 on MFCC, ~110k parameters")(Res8)
MODELS.register("ds-cnn", "Hello Edge DS-CNN small on MFCC, ~23k parameters")(DSCNN)
MODELS.register("lstm", "LSTM with attention pooling on log-mel, ~90k parameters")(LSTMClassifier)
MODELS.register("m5", "Dai et al. M5 on raw waveforms, ~0.56M parameters")(M5)
