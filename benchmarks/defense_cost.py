"""What the defenses cost, as ratios measured in one run (machine-independent numbers):

(a) seconds per training step of GN-FT's gradient-norm step, approximate (two passes) and
    exact (double backprop), against a plain step (methods.md §5 expects about 1.6× and 4×);
(b) Fine-Pruning's cut search: holdout evaluations and seconds of the binary search against a
    full sweep (methods.md §2: O(log C) against O(C));
(c) peak working memory of ``activation_stats`` at 1k and 20k samples: it streams, so it must
    not grow with the data;
(d) every registered defense at its defaults on one backdoored model and the same defender data:
    forward and backward passes (samples) and seconds, each relative to FT's.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/defense_cost.py [--quick]
        [--parts abcd] [--defenses ft,anp,...] [--set anp.iterations=200 ...] [--json FILE]

A defense's cost is linear in its iterations or epochs, so ``--set`` measures a long default
(ANP's 2,000 iterations) at a fraction and scales it (the table says which were set).

small-cnn on synthetic 1×28×28 images, 10 classes, one thread. Part (c) runs each size in a
fresh process (Linux only) so that the process's peak resident memory belongs to that pass,
after a one-batch warm-up that absorbs the libraries' one-off set-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from torchpurify.attacks import build_attack, poison_split
from torchpurify.cli import parse_settings
from torchpurify.data.base import Split
from torchpurify.defenses import DEFENSES, Clean, build_defense
from torchpurify.defenses.two_pass import gradient_norm_step
from torchpurify.errors import UserError
from torchpurify.models import build_model
from torchpurify.neurons import activation_stats, default_neuron_layer
from torchpurify.train import Cost, TrainConfig, fit, standard_step

SHAPE = (1, 28, 28)
CLASSES = 10
APPROX_TARGET = 1.8


def random_split(n: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    return Split(
        torch.rand(n, *SHAPE, generator=generator),
        torch.randint(0, CLASSES, (n,), generator=generator),
    )


def prototype_split(n: int, seed: int, noise: float = 0.3) -> Split:
    """A learnable task: class k is a fixed smooth random pattern (shared by all seeds) plus
    pixel noise, so a quick model reaches high but imperfect accuracy and pruning matters."""
    prototypes = F.interpolate(
        torch.randn(CLASSES, 1, 7, 7, generator=torch.Generator().manual_seed(1234)),
        size=SHAPE[1:],
        mode="bilinear",
    )
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    x = 0.5 + 0.2 * prototypes[y] + noise * torch.randn(n, *SHAPE, generator=generator)
    return Split(x.clamp(0, 1), y)


def step_costs(steps: int, batch_size: int) -> dict[str, float]:
    """Median seconds per step of each update rule, interleaved in rounds so that load from
    other processes hits every rule alike."""
    data = random_split(4 * batch_size, seed=0)
    batches = [(x, y) for x, y in data.batches(batch_size)]
    torch.manual_seed(0)
    base = build_model("small-cnn", SHAPE, CLASSES)
    memory_format = torch.channels_last if getattr(base, "channels_last", True) else None
    rules = {
        "plain": standard_step,
        "approx": gradient_norm_step("approx", 0.05, 0.7, False),
        "approx-half": gradient_norm_step("approx", 0.05, 0.7, False, second_pass=0.5),
        "exact": gradient_norm_step("exact", 0.05, 0.7, False),
    }
    runs = {}
    for name in rules:
        model = copy.deepcopy(base).train()
        if memory_format is not None:
            model.to(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runs[name] = (model, optimizer)
    if memory_format is not None:
        batches = [(x.contiguous(memory_format=memory_format), y) for x, y in batches]

    def run(name: str, count: int) -> float:
        model, optimizer = runs[name]
        start = time.perf_counter()
        for i in range(count):
            x, y = batches[i % len(batches)]
            rules[name](model, x, y, optimizer, Cost())
        return (time.perf_counter() - start) / count

    for name in rules:
        run(name, 3)  # warm-up: allocator, kernels
    per_round = 5
    samples = {name: [] for name in rules}
    for _ in range(max(1, steps // per_round)):
        for name in rules:
            samples[name].append(run(name, per_round))
    return {name: statistics.median(times) for name, times in samples.items()}


def search_costs(train_size: int, holdout_size: int, epochs: int) -> dict[str, dict]:
    """Fine-Pruning (prune only) with each cut search on a quickly trained small-cnn."""
    torch.manual_seed(0)
    model = build_model("small-cnn", SHAPE, CLASSES)
    config = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, progress=False, device="cpu")
    fit(model, prototype_split(train_size, seed=0), config)
    clean = Clean(prototype_split(holdout_size, seed=1), prototype_split(holdout_size, seed=2))
    results = {}
    for search in ("binary", "sweep"):
        defense = build_defense(
            "fine-pruning", prune_only=True, search=search, device="cpu", batch_size=256
        )
        purified = defense.purify(model, clean)
        results[search] = {
            "evaluations": purified.log["holdout_evaluations"],
            "seconds": purified.cost.seconds,
            "pruned": purified.log["num_pruned"],
            "channels": purified.log["channels"],
            "acc_before": purified.log["holdout_acc_before"],
            "acc_pruned": purified.log["holdout_acc_pruned"],
        }
    return results


def resident_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in KiB, from /proc (Linux). Not
    ``ru_maxrss``: Linux carries it over from the parent through fork and exec."""
    with open("/proc/self/status") as file:
        line = next(line for line in file if line.startswith(field + ":"))
    return int(line.split()[1])


def memory_child(samples: int) -> None:
    """Run in a fresh process: the working memory one ``activation_stats`` pass adds."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("small-cnn", SHAPE, CLASSES).eval()
    data = random_split(samples, seed=0).x
    layer = default_neuron_layer(model, data[:2])
    activation_stats(model, layer, data[:256], batch_size=256)  # lazy one-off library set-up
    before = resident_kib("VmRSS")
    stats = activation_stats(model, layer, data, batch_size=256)
    peak = resident_kib("VmHWM")
    print(json.dumps({"extra_kib": max(0, peak - before), "channels": len(stats.mean)}))


def memory_costs(sizes: list[int]) -> dict[int, int] | None:
    if not sys.platform.startswith("linux"):
        return None
    results = {}
    for n in sizes:
        output = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n)],
            check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        ).stdout  # fmt: skip
        results[n] = json.loads(output.strip().splitlines()[-1])["extra_kib"]
    return results


def layer_bytes_per_sample() -> int:
    """What keeping the neuron layer's activations (float32) would cost per sample."""
    model = build_model("small-cnn", SHAPE, CLASSES).eval()
    example = torch.zeros(1, *SHAPE)
    layer = default_neuron_layer(model, example)
    shapes = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: shapes.append(o))
    with torch.no_grad():
        model(example)
    handle.remove()
    return shapes[0].numel() * 4


def defense_costs(
    names: list[str], tune_size: int, holdout_size: int, epochs: int,
    settings: dict[str, dict] | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each defense at its defaults on one BadNets-backdoored small-cnn and the same defender
    data (the development protocol's 1,440 tune / 360 holdout by default)."""
    trigger = build_attack("badnets", SHAPE)
    train = poison_split(prototype_split(4000, seed=0), trigger, rate=0.1, seed=0).split
    torch.manual_seed(0)
    model = build_model("small-cnn", SHAPE, CLASSES)
    fit(model, train, TrainConfig(epochs=epochs, batch_size=128, progress=False, device="cpu"))
    clean = Clean(prototype_split(tune_size, seed=1), prototype_split(holdout_size, seed=2))
    results = {}
    for name in names:
        params = (settings or {}).get(name, {})
        purified = build_defense(name, device="cpu", **params).purify(model, clean)
        cost = purified.cost
        results[name] = {
            "seconds": cost.seconds,
            "forward": cost.forward,
            "backward": cost.backward,
            "settings": params,
        }
        print(
            f"  {name} {params or ''}: {cost.seconds:.1f} s, forward {cost.forward}, "
            f"backward {cost.backward}",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    return results


def print_defense_costs(results: dict[str, dict[str, float]]) -> None:
    base = results.get("ft")
    print(f"{'defense':<14}{'forward':>11}{'backward':>11}{'seconds':>9}"
          f"{'fwd × FT':>10}{'bwd × FT':>10}{'s × FT':>8}")  # fmt: skip
    for name, cost in results.items():
        ratios = [
            cost[k] / base[k] if base and base[k] else float("nan")
            for k in ("forward", "backward", "seconds")
        ]
        print(
            f"{name:<14}{cost['forward']:>11}{cost['backward']:>11}{cost['seconds']:>9.1f}"
            f"{ratios[0]:>10.2f}{ratios[1]:>10.2f}{ratios[2]:>8.2f}"
        )
    for name, cost in results.items():
        if cost.get("settings"):
            settings = " ".join(f"{k}={v}" for k, v in cost["settings"].items())
            print(f"{name} ran with {settings}, not its defaults")


def defense_settings(
    items: list[str], names: list[str], parser: argparse.ArgumentParser
) -> dict[str, dict]:
    """``["anp.iterations=200"]`` → ``{"anp": {"iterations": 200}}``; every defense of (d) is
    built once with its settings, so a mistake ends in one line and exit code 2 before any
    model is trained."""
    settings: dict[str, dict] = {}
    for item in items:
        name, dot, setting = item.partition(".")
        if not dot or name not in names:
            parser.error(
                f"--set takes NAME.KEY=VALUE, NAME one of {', '.join(names)}; got {item!r}"
            )
        try:
            settings.setdefault(name, {}).update(parse_settings([setting]))
        except UserError as error:
            parser.error(f"--set {item}: {error}")
    for name in names:
        try:
            build_defense(name, device="cpu", **settings.get(name, {}))
        except UserError as error:
            parser.error(str(error))
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (~1 min)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per rule (a)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="abcd", help="which parts to run, e.g. d")
    parser.add_argument(
        "--defenses", default=None, help="comma-separated defenses for (d) (default: all)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME.KEY=VALUE",
        help="a defense's hyper-parameter for (d), e.g. anp.iterations=200 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write (d)'s numbers to this file")
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(1)
    steps = args.steps or (10 if args.quick else 30)
    print(f"torch {torch.__version__}, 1 thread, small-cnn, input {SHAPE}, {CLASSES} classes")
    if "d" in args.parts:
        names = args.defenses.split(",") if args.defenses else DEFENSES.names()
        names = ["ft"] + [n for n in names if n != "ft"]
        settings = defense_settings(args.set, names, parser)
        tune, holdout = (288, 72) if args.quick else (1440, 360)
        print(f"\n(d) each defense at its defaults (but --set), tune {tune}, holdout {holdout}, "
              "BadNets model")  # fmt: skip
        results = defense_costs(
            names, tune, holdout, epochs=1 if args.quick else 3, settings=settings
        )
        print_defense_costs(results)
        if args.json:
            with open(args.json, "w") as file:
                json.dump({"tune": tune, "holdout": holdout, "defenses": results}, file, indent=1)
    if "a" in args.parts:
        part_a(steps, args.batch_size)
    if "b" in args.parts:
        part_b(args.quick)
    if "c" in args.parts:
        part_c(args.quick)


def part_a(steps: int, batch_size: int) -> None:
    costs = step_costs(steps, batch_size)
    print(f"\n(a) seconds per training step, batch {batch_size}, median of {steps} steps")
    print(f"{'step':<28}{'s/step':>9}{'× plain':>9}")
    labels = {
        "plain": "standard_step",
        "approx": "gradient-norm approx",
        "approx-half": "  second_pass=0.5",
        "exact": "gradient-norm exact",
    }
    for name, seconds in costs.items():
        print(f"{labels[name]:<28}{seconds:>9.4f}{seconds / costs['plain']:>9.2f}")
    ratio = costs["approx"] / costs["plain"]
    verdict = "meets" if ratio <= APPROX_TARGET else "MISSES"
    print(f"approx/plain {ratio:.2f} {verdict} the ≤ {APPROX_TARGET}× target")
    half = costs["approx-half"] / costs["plain"]
    verdict = "meets" if half <= APPROX_TARGET else "MISSES"
    print(f"approx (second_pass=0.5)/plain {half:.2f} {verdict} the ≤ {APPROX_TARGET}× target")


def part_b(quick: bool) -> None:
    train_size, holdout_size, epochs = (1000, 200, 2) if quick else (2000, 400, 3)
    search = search_costs(train_size, holdout_size, epochs)
    print(
        f"\n(b) Fine-Pruning cut search (prune only), holdout {holdout_size}, "
        f"{search['binary']['channels']} channels"
    )
    print(f"{'search':<10}{'evaluations':>12}{'seconds':>9}{'pruned':>8}{'acc':>13}")
    for name, result in search.items():
        accs = f"{result['acc_before']:.3f}→{result['acc_pruned']:.3f}"
        print(
            f"{name:<10}{result['evaluations']:>12}{result['seconds']:>9.2f}"
            f"{result['pruned']:>8}{accs:>13}"
        )
    print(
        f"sweep/binary: {search['sweep']['evaluations'] / search['binary']['evaluations']:.1f}× "
        f"evaluations, {search['sweep']['seconds'] / search['binary']['seconds']:.1f}× seconds"
    )


def part_c(quick: bool) -> None:
    sizes = [1000, 5000] if quick else [1000, 20000]
    memory = memory_costs(sizes)
    print("\n(c) activation_stats working memory (peak RSS above the data), batch 256")
    if memory is None:
        print("skipped: needs Linux (/proc/self/status)")
        return
    per_sample = layer_bytes_per_sample()
    print(f"{'samples':>8}{'working MiB':>13}{'all activations MiB':>21}")
    for n, kib in memory.items():
        print(f"{n:>8}{kib / 1024:>13.1f}{n * per_sample / 2**20:>21.1f}")
    small, large = (memory[n] for n in sizes)
    print(
        f"{sizes[1]} / {sizes[0]} samples: working memory ×{large / max(small, 1):.2f} "
        f"(data ×{sizes[1] / sizes[0]:.0f})"
    )


if __name__ == "__main__":
    main()
