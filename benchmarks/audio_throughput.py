"""Audio throughput: front ends (clips/s), and per keyword-spotting model training (clips/s
through the project's training loop) and inference (clips/s), at 1 thread and at all cores,
with and without channels_last for the 2-D models, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/audio_throughput.py [--clips 512] [--batch-size 64]

Inputs are random 1-s waveforms at 16 kHz. The ratio column (channels_last ÷ contiguous) is the
number to compare across machines; on a shared machine the absolute rates move with the load.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from torchpurify.data.base import Split
from torchpurify.features import MFCC, LogMel
from torchpurify.models import build_model
from torchpurify.train import TrainConfig, fit

TWO_D = ("kws-cnn", "res8", "ds-cnn")


def waveforms(n: int, length: int) -> torch.Tensor:
    return torch.rand(n, length, generator=torch.Generator().manual_seed(0)) * 2 - 1


def best_rate(run, clips: int, repeats: int = 3) -> float:
    """Clips/s of the fastest of ``repeats`` timed calls (after one warm-up call)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return clips / min(times)


def front_end_rate(module: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return best_rate(lambda: module(x), len(x))


def training_rate(name: str, channels_last: bool, x: torch.Tensor, batch_size: int) -> float:
    torch.manual_seed(0)
    model = build_model(name, tuple(x.shape[1:]), 12)
    model.channels_last = channels_last
    data = Split(x, torch.randint(0, 12, (len(x),), generator=torch.Generator().manual_seed(1)))
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=0.01, progress=False, device="cpu")
    fit(model, Split(x[: 2 * batch_size], data.y[: 2 * batch_size]), config)  # warm-up
    result = fit(model, data, config)
    return (len(x) // batch_size) * batch_size / result.cost.seconds


def inference_rate(name: str, channels_last: bool, x: torch.Tensor, batch_size: int) -> float:
    model = build_model(name, tuple(x.shape[1:]), 12).eval()
    model.channels_last = channels_last

    def run():
        with torch.no_grad():
            for batch in x.split(batch_size):
                model(batch)

    return best_rate(run, len(x), repeats=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=512, help="training clips per timed epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", default="kws-cnn,res8,ds-cnn,lstm,m5")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}")
    args = parser.parse_args()
    x = waveforms(args.clips, 16000)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s), batch {args.batch_size}, {args.clips} 1-s clips")
        for label, module in (("LogMel", LogMel()), ("MFCC", MFCC())):
            print(f"  front end {label:<8}{front_end_rate(module, x[:256]):>10.0f} clips/s")
        print(
            f"  {'model':<9}{'layout':<15}{'train/s':>9}{'ratio':>7}{'infer/s':>10}{'ratio':>7}"
        )
        for name in args.models.split(","):
            layouts = (False, True) if name in TWO_D else (False,)
            rates = {
                cl: (
                    training_rate(name, cl, x, args.batch_size),
                    inference_rate(name, cl, x, 256),
                )
                for cl in layouts
            }
            for cl, (train, infer) in rates.items():
                base_train, base_infer = rates[False]
                layout = "channels_last" if cl else "contiguous"
                print(
                    f"  {name:<9}{layout:<15}{train:>9.0f}{train / base_train:>7.2f}"
                    f"{infer:>10.0f}{infer / base_infer:>7.2f}"
                )


if __name__ == "__main__":
    main()
