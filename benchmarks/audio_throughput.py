"""Audio throughput: front ends (clips/s), and per keyword-spotting model training (clips/s
through the project's training loop) and inference (clips/s), at 1 thread and at all cores,
with and without channels_last for the 2-D models, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/audio_throughput.py [--clips 1024] [--batch-size 64]

Inputs are random 1-s waveforms at 16 kHz. The ratio column (channels_last ÷ contiguous) is the
number to compare across machines; on a shared machine the absolute rates move with the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from torchpurify.data.base import Split
from torchpurify.features import MFCC, LogMel
from torchpurify.models import build_model
from torchpurify.train import TrainConfig, fit, standard_step

TWO_D = ("kws-cnn", "res8", "ds-cnn")


def waveforms(n: int, length: int) -> torch.Tensor:
    return torch.rand(n, length, generator=torch.Generator().manual_seed(0)) * 2 - 1


def median_rate(run, clips: int, repeats: int) -> float:
    """Clips/s from the median of ``repeats`` timed calls, after one warm-up call. (The median
    rather than the total: on a shared machine other jobs stall some calls.)"""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return clips / statistics.median(times)


def front_end_rate(module: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return median_rate(lambda: module(x), len(x), repeats=7)


def model_rates(
    name: str, layouts: tuple[bool, ...], x: torch.Tensor, batch_size: int, rounds: int = 4
) -> dict[bool, tuple[float, float]]:
    """``{channels_last: (training clips/s, inference clips/s)}`` for one model.

    Training goes through ``train.fit``; a rate is the batch size over the median time of a
    training step, or of a no-grad forward pass over 256 clips. The layouts take turns over
    ``rounds`` parts of the data, so a change in the machine's load hits them alike.
    """
    y = torch.randint(0, 12, (len(x),), generator=torch.Generator().manual_seed(1))
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=0.01, progress=False, device="cpu")
    models, train_times, infer_times = {}, {}, {}
    for layout in layouts:
        torch.manual_seed(0)
        models[layout] = build_model(name, tuple(x.shape[1:]), 12)
        models[layout].channels_last = layout
        train_times[layout], infer_times[layout] = [], []
        fit(models[layout], Split(x[: 2 * batch_size], y[: 2 * batch_size]), config)  # warm-up

    def timed_step(times):
        def step(*args):
            start = time.perf_counter()
            loss = standard_step(*args)
            times.append(time.perf_counter() - start)
            return loss

        return step

    part = len(x) // rounds
    for r in range(rounds):
        chunk = Split(x[r * part : (r + 1) * part], y[r * part : (r + 1) * part])
        for layout, model in models.items():
            fit(model, chunk, config, step=timed_step(train_times[layout]))
            with torch.no_grad():
                start = time.perf_counter()
                model(x[:256])
                infer_times[layout].append(time.perf_counter() - start)
    return {
        layout: (
            batch_size / statistics.median(train_times[layout]),
            min(256, len(x)) / statistics.median(infer_times[layout]),
        )
        for layout in layouts
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1024, help="training clips per model")
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
        print(f"  {'model':<9}{'layout':<15}{'train/s':>9}{'ratio':>7}{'infer/s':>10}{'ratio':>7}")
        for name in args.models.split(","):
            layouts = (False, True) if name in TWO_D else (False,)
            rates = model_rates(name, layouts, x, args.batch_size)
            for cl, (train, infer) in rates.items():
                base_train, base_infer = rates[False]
                layout = "channels_last" if cl else "contiguous"
                print(
                    f"  {name:<9}{layout:<15}{train:>9.0f}{train / base_train:>7.2f}"
                    f"{infer:>10.0f}{infer / base_infer:>7.2f}"
                )


if __name__ == "__main__":
    main()
