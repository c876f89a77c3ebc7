"""Training throughput (images/s) of small-cnn and preact-resnet18, with and without
channels_last, measured in one run through the project's training loop.

    python benchmarks/train_throughput.py [--images 2048] [--batch-size 128]

The ratio column (channels_last ÷ contiguous) is the number to compare across machines.
"""

from __future__ import annotations

import argparse

import torch

from torchpurify.data.base import Split
from torchpurify.models import build_model
from torchpurify.train import TrainConfig, fit


def throughput(
    model_name: str, channels_last: bool, images: int, batch_size: int, shape: tuple[int, ...]
) -> float:
    torch.manual_seed(0)
    data = Split(torch.rand(images, *shape), torch.randint(0, 10, (images,)))
    model = build_model(model_name, shape, 10)
    warmup = Split(data.x[: 2 * batch_size], data.y[: 2 * batch_size])
    config = TrainConfig(
        epochs=1, batch_size=batch_size, channels_last=channels_last, progress=False
    )
    fit(model, warmup, config)
    result = fit(model, data, config)
    return (len(data) // batch_size) * batch_size / result.cost.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shape", default="1,28,28", help="C,H,W of the synthetic images")
    parser.add_argument("--models", default="small-cnn,preact-resnet18")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {shape}, "
        f"batch {args.batch_size}"
    )
    print(f"{'model':<18}{'contiguous':>12}{'channels_last':>15}{'ratio':>8}")
    for name in args.models.split(","):
        images = args.images if name == "small-cnn" else max(args.batch_size * 3, args.images // 8)
        plain = throughput(name, False, images, args.batch_size, shape)
        last = throughput(name, True, images, args.batch_size, shape)
        print(f"{name:<18}{plain:>10.0f}/s{last:>13.0f}/s{last / plain:>8.2f}")


if __name__ == "__main__":
    main()
