"""The ``torchpurify`` command line: train, evaluate, list.

Every user mistake ends in one line on stderr and exit code 2; nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

try:
    from typer.core import _click as click  # typer ≥ 0.20 ships its own copy of click
except ImportError:
    import click

from torchpurify.errors import Divergence, UserError
from torchpurify.registry import MAX_SEED


class OneLineErrors(TyperGroup):
    """Click's usage errors (a bad number, an unknown option or choice) as one line on stderr,
    ``error: …``, exit code 2 — like every other user mistake — instead of a framed box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if standalone_mode:
            try:
                quick_answer(sys.argv[1:] if args is None else list(args))
            except typer.Exit as done:
                sys.exit(done.exit_code)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as error:
            if not standalone_mode:
                raise
            click.echo(error.ctx.get_help())
            sys.exit(0)
        except click.exceptions.ClickException as error:
            if not standalone_mode:
                raise
            err.print(f"[bold red]error:[/] {one_line(error)}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            err.print("aborted")
            sys.exit(1)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


def one_line(error: Exception) -> str:
    """The error's message on one line, with a near miss of a choice named, and where to look."""
    from rich.markup import escape

    from torchpurify.registry import suggestion

    message = " ".join(error.format_message().split()).replace("Value error, ", "")
    choice = re.search(r"'([^']*)' is not one of ((?:'[^']*'(?:, )?)+)", message)
    if choice:
        choices = re.findall(r"'([^']*)'", choice[2])
        message = message.rstrip(".") + suggestion(choice[1], choices, "")
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        message += f" (see {ctx.command_path} --help)"
    return escape(message)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Find and remove backdoors in trained neural networks, neuron by neuron.",
)
out = Console()
err = Console(stderr=True)


def print_version(value: bool) -> None:
    """``--version``: the installed distribution's version (no torch imported)."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("torchpurify")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from torchpurify import __version__ as number
        out.print(f"torchpurify {number}", highlight=False)
        raise typer.Exit()


@app.callback()
def settings_for_every_command(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=print_version, help="Print the version and exit."
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for torch (default: torch's choice). Use 1 when other heavy "
            "processes share the cores: competing thread pools can run far slower.",
        ),
    ] = None,
) -> None:
    """Find and remove backdoors in trained neural networks, neuron by neuron."""
    if threads is not None:
        if threads < 1:
            err.print(f"[bold red]error:[/] --threads must be at least 1, got {threads}")
            raise typer.Exit(UserError.exit_code)
        import torch

        torch.set_num_threads(threads)


@contextlib.contextmanager
def first_interrupt_only():
    """The first Ctrl-C interrupts the command; later ones, while it cleans up (removes its
    staging folders) and says what exists, are ignored instead of ending in a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = []

    def interrupt(signum, frame):
        hits.append(signum)
        if len(hits) == 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def one_line_errors(function):
    """``function`` with :class:`UserError` (and :class:`Divergence`) turned into one line on
    stderr and its exit code, and Ctrl-C into what exists and exit code 130."""

    @functools.wraps(function)
    def run(*a, **k):
        from rich.markup import escape

        from torchpurify.outputs import WRITTEN, interrupted_message

        WRITTEN.clear()
        try:
            with first_interrupt_only():
                return function(*a, **k)
        except UserError as error:
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False,
                      soft_wrap=True)  # fmt: skip
            raise typer.Exit(UserError.exit_code) from None
        except Divergence as error:  # not the user's mistake, but one line all the same
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False,
                      soft_wrap=True)  # fmt: skip
            raise typer.Exit(Divergence.exit_code) from None
        except KeyboardInterrupt:
            err.print(interrupted_message(), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return run


def command(*args, **kwargs):
    """``app.command`` that turns :class:`UserError` into one line on stderr and exit code 2."""

    def wrap(function):
        return app.command(*args, **kwargs)(one_line_errors(function))

    return wrap


def quick_answer(args: list[str]) -> None:
    """``list KIND`` and ``run SPEC`` (nothing else on the line) answered before typer reads
    any option: its converters import pydantic, which doubles the start-up of a one-line
    answer. ``list`` prints and exits 0; a spec the first (torch-free) pass refuses is its one
    line and exit code 2; any other line, or a spec that passes, goes on through typer."""
    if len(args) != 2 or args[1].startswith("-"):
        return
    if args[0] == "list" and args[1] in {kind.value for kind in Listing}:
        list_(Listing(args[1]))
        raise typer.Exit(0)
    if args[0] == "run":
        from torchpurify.spec import check_spec_file

        one_line_errors(check_spec_file)(Path(args[1]))


def parse_settings(settings: list[str] | None, option: str = "--set") -> dict[str, Any]:
    """``["alpha=0.7", "lr=1e-3", "position=top-left"]`` → ``{"alpha": 0.7, "lr": 0.001,
    "position": "top-left"}``: values read as YAML 1.2, as in specs."""
    from torchpurify.spec import read_value

    parsed: dict[str, Any] = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option} takes KEY=VALUE, got {item!r}")
        parsed[key.strip().replace("-", "_")] = read_value(value)
    return parsed


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def metrics_table(rows: dict[str, dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("model")
    for column in ("ACC", "ASR", "RA"):
        table.add_column(column, justify="right")
    for name, m in rows.items():
        table.add_row(name, fmt(m.get("acc")), fmt(m.get("asr")), fmt(m.get("ra")))
    return table


class TargetMode(str, Enum):
    all_to_one = "all-to-one"
    all_to_all = "all-to-all"


class Optimizer(str, Enum):
    sgd = "sgd"
    adam = "adam"


class Schedule(str, Enum):
    cosine = "cosine"
    constant = "constant"


Arch = Annotated[
    str | None,
    typer.Option(
        help="Architecture: a registered name or your own module:function. Needed for a bare "
        ".pt/.pth/.safetensors file; for a model directory it allows the module:function its "
        "card names.",
    ),
]
TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Import and call the module:function architecture a model card names, without "
        "naming it with --arch. Only for models you trust: it runs their code.",
    ),
]
CleanPath = Annotated[
    Path | None,
    typer.Option(
        "--clean",
        help="Your clean data: ROOT/<class>/*.png|jpg, ROOT/<word>/*.wav, or an .npz with x and y "
        "(folder names map to output indices: the model's class names, else numbers, else "
        "sorted). Needed for a bare weights file.",
    ),
]
TuneFraction = Annotated[
    float,
    typer.Option(
        help="With --clean: the share of it the defense trains on; the rest is the "
        "holdout, half read by the defense's stopping rules, half by its guard only."
    ),  # fmt: skip
]
Normalize = Annotated[
    str | None,
    typer.Option(
        help="With a bare image model: MEAN,STD (or one mean per channel, then one std per "
        "channel) applied to [0, 1] pixels before the model; recorded in the card.",
    ),
]
NumClasses = Annotated[
    int | None,
    typer.Option(help="With a bare weights file: its output count (default: from --clean)."),
]
SampleRate = Annotated[
    int | None,
    typer.Option(help="With audio: the model's sample rate (default: its own, else 16000)."),
]
Classes = Annotated[
    str | None,
    typer.Option(
        "--classes",
        help="With --clean: the model's classes in output order, NAME,NAME,..., or a .json "
        'file (a list in output order, or {"name": index}); class folders are mapped by it.',
    ),
]
AllowMissingClasses = Annotated[
    bool,
    typer.Option(
        "--allow-missing-classes",
        help="With --clean: go on when the clean data lacks some of the model's classes (a "
        "defense may then ruin those classes unseen).",
    ),
]


def seed_option(help_text: str = "Seed of every random choice.") -> Any:
    return typer.Option(min=0, max=MAX_SEED, help=help_text)


DataRoot = Annotated[
    str | None,
    typer.Option(help="The dataset's folder (default: $TORCHPURIFY_DATA, system packages, cache)."),
]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")]
Settings = Annotated[
    list[str] | None, typer.Option("--set", help="Attack parameter KEY=VALUE (repeatable).")
]
Force = Annotated[
    bool, typer.Option("--force", help="Replace an earlier torchpurify output at --out.")
]


@command()
def train(
    dataset: Annotated[str, typer.Option(help="Dataset name (see `torchpurify list datasets`).")],
    model: Annotated[str, typer.Option(help="Model name or your own module:function.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
    attack: Annotated[str | None, typer.Option(help="Attack name; omit for a clean model.")] = None,
    poison_rate: Annotated[
        float | None, typer.Option(help="Fraction poisoned (default 0.1).")
    ] = None,
    target: Annotated[int, typer.Option(help="Target label of the attack.")] = 0,
    target_mode: Annotated[TargetMode, typer.Option()] = TargetMode.all_to_one,
    clean_label: Annotated[
        bool | None,
        typer.Option("--clean-label/--dirty-label", help="Override the attack's default."),
    ] = None,
    settings: Settings = None,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 0.05,
    optimizer: Annotated[Optimizer, typer.Option()] = Optimizer.sgd,
    schedule: Annotated[Schedule, typer.Option()] = Schedule.cosine,
    augment: Annotated[
        bool,
        typer.Option(help="Random crop and flip (images), random time shift of ±10 % (waveforms)."),
    ] = False,
    channels_last: Annotated[
        bool | None,
        typer.Option("--channels-last/--no-channels-last", help="Default: the model's preference."),
    ] = None,
    seed: Annotated[int, seed_option()] = 0,
    device: Device = "auto",
    data_root: DataRoot = None,
    train_size: Annotated[int | None, typer.Option(help="Train on a random subset.")] = None,
    val_fraction: float = 0.1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    force: Force = False,
) -> None:
    """Train a model, backdoored with --attack or clean without, and report ACC / ASR / RA."""
    from torchpurify.experiment import AttackSpec, DataSpec, train_model
    from torchpurify.outputs import check_output
    from torchpurify.train import TrainConfig

    if attack is None and (poison_rate is not None or settings or clean_label is not None):
        raise UserError("--poison-rate, --set and --clean-label need --attack")
    attack_spec = None
    if attack is not None:
        attack_spec = AttackSpec(
            name=attack,
            params=parse_settings(settings),
            poison_rate=0.1 if poison_rate is None else poison_rate,
            target=target,
            target_mode=target_mode.value,
            clean_label=clean_label,
        )
    data = DataSpec(dataset, data_root, train_size, val_fraction, seed)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer.value,
        channels_last=channels_last,
        schedule=schedule.value,
        augment=augment,
        seed=seed,
        device=device,
        progress=progress,
    )
    check_output(out_dir, "model", force)

    def report(record: dict) -> None:
        val = f"  val acc {record['val_acc']:.4f}" if "val_acc" in record else ""
        val += f"  val asr {record['val_asr']:.4f}" if "val_asr" in record else ""
        phase = f" ({record['phase']})" if "phase" in record else ""  # pruning-aware
        err.print(
            f"epoch {record['epoch']}/{epochs}{phase}  loss {record['loss']:.4f}{val}"
            f"  {record['seconds']:.0f} s",
            highlight=False,
        )

    result = train_model(data, model, attack_spec, config, out=out_dir, on_epoch=report)
    if as_json:
        print(json.dumps(result.metrics.to_dict()))
    else:
        out.print(metrics_table({str(out_dir): result.metrics.to_dict()}, title="test split"))
        out.print(f"saved {out_dir}")


@command()
def evaluate(
    model: Annotated[
        Path, typer.Option(help="A model directory, or a .safetensors/.pt/.pth file.")
    ],
    dataset: Annotated[str | None, typer.Option(help="Dataset (default: the model's own).")] = None,
    arch: Arch = None,
    trust_code: TrustCode = False,
    attack: Annotated[
        str | None, typer.Option(help="Measure this attack's trigger instead of the model's own.")
    ] = None,
    settings: Settings = None,
    target: Annotated[int | None, typer.Option(help="Target label (default: the model's).")] = None,
    target_mode: Annotated[TargetMode | None, typer.Option()] = None,
    seed: Annotated[int, seed_option("Seed of the --attack trigger.")] = 0,
    data_root: DataRoot = None,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Measure ACC, ASR and RA of a model on its dataset's test split."""
    from torchpurify.attacks import build_attack
    from torchpurify.card import targeting
    from torchpurify.data import load_dataset
    from torchpurify.experiment import trigger_of
    from torchpurify.metrics import evaluate as measure
    from torchpurify.models.io import load_model, read_card
    from torchpurify.train import resolve_device

    if not model.exists():
        raise UserError(f"model {model} does not exist; give a model directory or weights file")
    card = read_card(model) if model.is_dir() else None
    name = dataset or (card or {}).get("data", {}).get("dataset")
    if name is None:
        raise UserError(f"{model} does not record its dataset; pass --dataset")
    data = load_dataset(name, root=data_root)
    net, card = load_model(
        model,
        arch,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        trust_code=trust_code,
    )
    if tuple(card["input_shape"]) != data.input_shape:
        raise UserError(
            f"the model takes inputs of shape {tuple(card['input_shape'])} but {name} has "
            f"{data.input_shape}; evaluate it on the dataset it was trained for"
        )
    if len(card["classes"]) != data.num_classes:
        raise UserError(
            f"the model has {len(card['classes'])} classes but {name} has {data.num_classes}"
        )
    recorded = card.get("attack") or {}
    if attack is not None:
        trigger = build_attack(attack, data.input_shape, seed=seed, **parse_settings(settings))
    else:
        if settings:
            raise UserError("--set needs --attack")
        trigger = trigger_of(card)
    target = recorded.get("target", 0) if target is None else target
    if not 0 <= target < data.num_classes:
        raise UserError(
            f"--target must be a label of {name}, 0..{data.num_classes - 1}; got {target}"
        )
    mode = target_mode.value if target_mode else recorded.get("target_mode", "all-to-one")
    how = targeting({"target": target, "target_mode": mode}, data.num_classes)
    resolved = resolve_device(device)
    metrics = measure(
        net.to(resolved), data.test, trigger, **how.as_kwargs(), batch_size=batch_size,
        device=resolved,
    )  # fmt: skip
    if as_json:
        print(json.dumps(metrics.to_dict()))
    else:
        out.print(metrics_table({str(model): metrics.to_dict()}, title=f"{name} test split"))
        if trigger is None:
            out.print("clean model: pass --attack NAME to measure a trigger's ASR")


@command()
def purify(
    model: Annotated[
        Path,
        typer.Option(
            help="A model directory, or your own .pt/.pth/.safetensors state dict (with --arch "
            "and --clean)."
        ),
    ],
    defense: Annotated[str, typer.Option(help="Defense name (see `torchpurify list defenses`).")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory to write the purified model to.")
    ],
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Defense hyper-parameter KEY=VALUE (repeatable)."),
    ] = None,
    defender_fraction: Annotated[
        float,
        typer.Option(help="Clean data the defender holds, as a fraction of the training set."),
    ] = 0.05,
    seed: Annotated[
        int | None,
        seed_option(
            "Seed of the defender's split and of the defense (default: a model directory's "
            "training seed, as the experiment runner uses; 0 for your own files)."
        ),
    ] = None,
    data_root: DataRoot = None,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    force: Force = False,
    arch: Arch = None,
    trust_code: TrustCode = False,
    clean: CleanPath = None,
    test: Annotated[
        Path | None,
        typer.Option(help="With --clean: test data (same layouts); ACC before and after."),
    ] = None,
    triggered: Annotated[
        Path | None,
        typer.Option(
            help="With --clean: a folder of triggered test inputs in their TRUE class folders; "
            "ASR/RA are measured on it (needs --target)."
        ),
    ] = None,
    attack: Annotated[
        str | None,
        typer.Option(help="With --clean and --test: the trigger to measure ASR/RA with."),
    ] = None,
    attack_settings: Annotated[
        list[str] | None,
        typer.Option("--attack-set", help="Parameter KEY=VALUE of --attack (repeatable)."),
    ] = None,
    target: Annotated[
        int | None, typer.Option(help="With --attack or --triggered: the attack's target label.")
    ] = None,
    target_mode: Annotated[TargetMode, typer.Option()] = TargetMode.all_to_one,
    tune_fraction: TuneFraction = 0.6,
    normalize: Normalize = None,
    num_classes: NumClasses = None,
    sample_rate: SampleRate = None,
    classes: Classes = None,
    allow_missing_classes: AllowMissingClasses = False,
    export: Annotated[
        Path | None,
        typer.Option(
            help="Also write the purified weights, every mask folded in, as a plain state dict "
            "(.pt/.pth) or .safetensors that loads into your own class with load_state_dict.",
        ),
    ] = None,
    estimate: Annotated[
        bool | None,
        typer.Option(
            "--estimate/--no-estimate",
            help="The defender-side backdoor estimate (trigger inversion on the holdout) before "
            "and after. Default: on for a model directory; with --clean, on when no trigger is "
            "named.",
        ),
    ] = None,
) -> None:
    """Purify a model with a defense; print ACC, ASR and RA before and after, and DER.

    Your own model: --model FILE --arch NAME|module:function --clean PATH [--test PATH]."""
    from torchpurify.auto import build_defense

    inputs = PurifyInputs(
        model=model, out=out_dir, force=force, arch=arch, trust_code=trust_code,
        estimate=estimate, seed=seed, data_root=data_root, defender_fraction=defender_fraction,
    )  # fmt: skip
    own = OwnFiles(
        clean=clean, test=test, triggered=triggered, attack=attack,
        attack_settings=attack_settings, target=target, target_mode=target_mode.value,
        tune_fraction=tune_fraction, normalize=normalize, num_classes=num_classes,
        sample_rate=sample_rate, classes=classes, allow_missing_classes=allow_missing_classes,
        export=export,
    )  # fmt: skip
    check_sources(inputs, own)
    chosen = build_defense(
        defense, device=device, seed=seed or 0, progress=progress, **parse_settings(settings)
    )
    check_outputs(inputs, own)
    if own.clean is None:
        shown = purify_directory(inputs, chosen)
    else:
        shown = purify_files(inputs, own, chosen)
    print_purified(shown, as_json)


@dataclasses.dataclass(frozen=True)
class PurifyInputs:
    """``purify``'s options that both sources read: the model, where the result goes, whose
    code may build it, the estimate's switch and the defender's seed (for a model directory
    also its data folder and share of the training set)."""

    model: Path
    out: Path
    force: bool = False
    arch: str | None = None
    trust_code: bool = False
    estimate: bool | None = None
    seed: int | None = None
    data_root: str | None = None
    defender_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class OwnFiles:
    """``purify``'s options for your own files: ``--clean`` and the options that go with it
    (:func:`torchpurify.api.purify_own` reads them)."""

    clean: Path | None = None
    test: Path | None = None
    triggered: Path | None = None
    attack: str | None = None
    attack_settings: list[str] | None = None
    target: int | None = None
    target_mode: str = TargetMode.all_to_one.value
    tune_fraction: float = 0.6
    normalize: str | None = None
    num_classes: int | None = None
    sample_rate: int | None = None
    classes: str | None = None
    allow_missing_classes: bool = False
    export: Path | None = None

    # The options that need --clean, by their field (target_mode and tune_fraction have defaults).
    WITH_CLEAN = {
        "--test": "test", "--triggered": "triggered", "--attack": "attack",
        "--attack-set": "attack_settings", "--target": "target", "--normalize": "normalize",
        "--num-classes": "num_classes", "--sample-rate": "sample_rate", "--export": "export",
        "--classes": "classes", "--allow-missing-classes": "allow_missing_classes",
    }  # fmt: skip

    def given_without_clean(self) -> list[str]:
        """The options given that go with --clean, as they are spelled on the command line."""
        return [option for option, field in self.WITH_CLEAN.items() if getattr(self, field)]


@dataclasses.dataclass(frozen=True)
class PurifyShown:
    """What ``purify`` prints of a run, from either source: the ``--json`` summary, the metrics
    table (``title`` None: no test data), the cost line, the estimate line and the rest."""

    summary: dict[str, Any]
    defense: str
    title: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    cost: str
    estimate: str | None
    log: dict[str, Any]
    out: Path
    notes: list[str] = dataclasses.field(default_factory=list)
    export: Path | None = None


def check_sources(inputs: PurifyInputs, own: OwnFiles) -> None:
    """The model exists; without --clean it is a model directory and no option that needs
    --clean was given."""
    model = inputs.model
    if not model.exists():
        raise UserError(f"model {model} does not exist; give a model directory or weights file")
    if own.clean is not None:
        return
    if not model.is_dir():
        raise UserError(
            f"{model} is a weights file: give your clean data with --clean PATH (and its "
            "architecture with --arch); only a model directory written by `torchpurify "
            "train` can rebuild its defender data from its card"
        )
    given = own.given_without_clean()
    if given:
        raise UserError(f"{', '.join(given)} go with --clean PATH (your own clean data)")


def check_outputs(inputs: PurifyInputs, own: OwnFiles) -> None:
    """Before any work: --out may be written (outputs.py), and --export is neither an input
    nor a file torchpurify did not write (models.io.check_export)."""
    from torchpurify.models.io import check_export
    from torchpurify.outputs import check_output

    check_output(inputs.out, "model", inputs.force)
    if own.export is not None:
        given = (inputs.model, own.clean, own.test, own.triggered)
        check_export(own.export, force=inputs.force, inputs=[p for p in given if p is not None],
                     out=inputs.out)  # fmt: skip


def purify_directory(inputs: PurifyInputs, chosen) -> PurifyShown:
    """A model directory written by ``torchpurify train``: its defender data and test split
    rebuilt from its card, the estimate before, the defense, the estimate after — as the
    runner's cells (:func:`torchpurify.experiment.purify_model`)."""
    from torchpurify.estimate import EstimateConfig
    from torchpurify.experiment import purify_model
    from torchpurify.models.io import load_model

    net, card = load_model(inputs.model, inputs.arch, trust_code=inputs.trust_code)
    seed = inputs.seed
    if seed is None:  # the card's training seed, as the runner's cells use it
        seed = (card.get("data") or {}).get("seed", 0)
        chosen = chosen.with_context(seed=seed)
    result = purify_model(
        net, card, chosen, root=inputs.data_root, defender_fraction=inputs.defender_fraction,
        seed=seed, out=inputs.out, estimate=None if inputs.estimate is False else EstimateConfig(),
        force=inputs.force,
    )  # fmt: skip
    record = result.card["defense"]
    keys = ("name", "before", "after", "der", "seconds", "forward_passes", "backward_passes")
    summary = {**{k: record[k] for k in keys}, "estimate": result.estimate,
               "chosen": record.get("chosen")}  # fmt: skip
    line = None
    if result.estimate is not None:
        flagged = result.estimate["before"]["flagged"]
        line = (
            f"backdoor estimate (clean holdout only), before: "
            f"{'backdoor suspected' if flagged else 'no backdoor found'}; "
            f"{result.estimate['summary']}"
        )
    return PurifyShown(
        summary, chosen.name, f"{inputs.model} — test split", result.before.to_dict(),
        result.after.to_dict(), f"DER {fmt(result.der)}   {cost_line(record)}", line,
        record["log"], inputs.out,
    )  # fmt: skip


def purify_files(inputs: PurifyInputs, own: OwnFiles, chosen) -> PurifyShown:
    """Your own weights and data files: :func:`torchpurify.api.purify_own` (read, check,
    measure on --test, the defense with the estimate before and after, write --out and
    --export)."""
    from torchpurify.api import parse_normalize, purify_own

    normalize = parse_normalize(own.normalize)
    result = purify_own(
        inputs.model, own.clean, chosen, inputs.out, arch=inputs.arch,
        trust_code=inputs.trust_code, test_path=own.test, triggered_path=own.triggered,
        attack=own.attack, attack_params=parse_settings(own.attack_settings, "--attack-set"),
        target=own.target, target_mode=own.target_mode, tune_fraction=own.tune_fraction,
        normalize=normalize, num_classes=own.num_classes, sample_rate=own.sample_rate,
        export=own.export, estimate=inputs.estimate, force=inputs.force, classes=own.classes,
        allow_missing_classes=own.allow_missing_classes,
    )  # fmt: skip
    record = result.record
    keys = ("defense", "seconds", "forward_passes", "backward_passes", "estimate", "chosen")
    summary = {k: v for k, v in record.to_dict().items() if k in keys}
    summary["before"] = result.before.to_dict() if result.before else None
    summary["after"] = result.after.to_dict() if result.after else None
    line = None
    if record.estimate is not None:
        line = f"backdoor estimate (clean holdout only): {record.estimate['summary']}"
    return PurifyShown(
        summary, chosen.name, f"{inputs.model} — your test data", summary["before"],
        summary["after"], cost_line(record.to_dict()), line, record.log, inputs.out,
        result.notes, own.export,
    )  # fmt: skip


def cost_line(record: dict[str, Any]) -> str:
    """Seconds, sample passes and the defender data's sizes of a defense's record."""
    return (
        f"{record['seconds']:.1f} s   {record['forward_passes']} forward / "
        f"{record['backward_passes']} backward sample passes   defender data: "
        f"{record['tune_size']} tune, {record['holdout_size']} holdout"
    )


def print_purified(shown: PurifyShown, as_json: bool) -> None:
    """``purify``'s output: the JSON summary, or notes, metrics, cost, estimate, the guard's
    and auto's lines, and what was written."""
    from torchpurify.auto import describe

    if as_json:
        print(json.dumps(shown.summary))
        return
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    for note in shown.notes:
        err.print(f"note: {note}", **plain)
    if shown.before is not None:
        rows = {"before": shown.before, f"after {shown.defense}": shown.after}
        out.print(metrics_table(rows, title=shown.title))
    else:
        out.print("no --test data: ACC/ASR not measured", **plain)
    out.print(shown.cost, **plain)
    if shown.estimate is not None:
        out.print(shown.estimate, **plain)
    print_guard(shown.log.get("guard"))
    if describe(shown.log):
        out.print(describe(shown.log), **plain)
    out.print(f"saved {shown.out}", **plain)
    if shown.export is not None:
        out.print(f"exported {shown.export} (masks folded; load_state_dict into your class)",
                  **plain)  # fmt: skip


def print_guard(guard: dict | None) -> None:
    """Say when the holdout guard (methods.md §0) backed off or rolled back, or could not check
    every class; silent otherwise."""
    if guard and guard.get("note"):
        out.print(f"guard: {guard['note']}", markup=False, highlight=False, soft_wrap=True)
    if not guard or guard.get("action", "kept") == "kept":
        return
    tried = [a["holdout_acc"] for a in guard["attempts"]]
    shown = ", ".join("diverged" if acc is None else f"{acc:.3f}" for acc in tried)
    out.print(
        f"guard: {guard['action']} (holdout ACC of the input {guard['holdout_acc_input']:.3f}, "
        f"floor {guard['floor']:.3f}, attempts {shown})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _model_and_holdout(
    model: Path, data_root: str | None, defender_fraction: float, *, arch: str | None = None,
    trust_code: bool = False, clean: Path | None = None, tune_fraction: float = 0.6,
    seed: int | None = None, normalize: str | None = None, num_classes: int | None = None,
    sample_rate: int | None = None, classes: str | None = None,
    allow_missing_classes: bool = False,
):  # fmt: skip
    """A model and the defender's clean holdout: drawn from your --clean data, or rebuilt from
    the card of a model directory written by `torchpurify train`."""
    from torchpurify.experiment import defender_data
    from torchpurify.models.io import load_model

    if not model.exists():
        raise UserError(f"model {model} does not exist; give a model directory or weights file")
    if clean is not None:
        from torchpurify.api import load_own, parse_normalize, split_clean

        own = load_own(
            model, clean, arch, trust_code=trust_code, normalize=parse_normalize(normalize),
            num_classes=num_classes, sample_rate=sample_rate, classes=classes,
            allow_missing_classes=allow_missing_classes, seed=seed or 0,
        )  # fmt: skip
        for note in own.notes:
            err.print(f"note: {note}", markup=False, highlight=False)
        holdout = split_clean(own.data.split, tune_fraction, seed or 0).holdout
        return own.model, own.card, holdout
    if classes is not None or allow_missing_classes:
        raise UserError("--classes and --allow-missing-classes go with --clean PATH")
    if not model.is_dir():
        raise UserError(
            f"{model} is a weights file: give your clean data with --clean PATH and the "
            "architecture with --arch"
        )
    net, card = load_model(model, arch, trust_code=trust_code)
    _, holdout, _ = defender_data(card, root=data_root, fraction=defender_fraction, seed=seed)
    return net, card, holdout


@command()
def detect(
    model: Annotated[
        Path, typer.Option(help="A model directory, or your own weights file (with --clean).")
    ],
    steps: Annotated[int, typer.Option(help="Optimisation steps per label.")] = 300,
    seed: Annotated[int, seed_option()] = 0,
    defender_fraction: float = 0.05,
    data_root: DataRoot = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (a step per label).")] = True,
    arch: Arch = None,
    trust_code: TrustCode = False,
    clean: CleanPath = None,
    tune_fraction: TuneFraction = 0.6,
    normalize: Normalize = None,
    num_classes: NumClasses = None,
    sample_rate: SampleRate = None,
    classes: Classes = None,
    allow_missing_classes: AllowMissingClasses = False,
) -> None:
    """Neural-Cleanse trigger inversion on clean data: suspected target and anomaly per label."""
    from torchpurify.diagnostics import detect as run_detect

    net, _, holdout = _model_and_holdout(
        model, data_root, defender_fraction, arch=arch, trust_code=trust_code, clean=clean,
        tune_fraction=tune_fraction, seed=seed if clean is not None else None,
        normalize=normalize, num_classes=num_classes, sample_rate=sample_rate, classes=classes,
        allow_missing_classes=allow_missing_classes,
    )  # fmt: skip
    result = run_detect(net, holdout, steps=steps, seed=seed, progress=progress)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{model} — inverted triggers ({len(holdout)} clean holdout samples)")
    for column in ("label", "anomaly index", "mask L1", "success"):
        table.add_column(column, justify="right")
    for row in result["labels"]:
        table.add_row(
            str(row["label"]),
            f"{row['anomaly_index']:.2f}",
            f"{row['mask_norm']:.1f}",
            f"{row['success']:.3f}",
        )
    out.print(table)
    if result["target"] is None:
        out.print(
            f"no backdoor detected (no label with anomaly index > 2 whose trigger works); "
            f"most anomalous label: {result['most_anomalous']}"
        )
    else:
        out.print(f"suspected backdoor target: label {result['target']}")


@command()
def inspect(
    model: Annotated[
        Path, typer.Option(help="A backdoored model directory (its card has the attack).")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory for the CSV, JSON and PNG files.")
    ],
    layer: Annotated[
        str | None, typer.Option(help="Module name (default: the neuron layer).")
    ] = None,
    inverted: Annotated[
        bool, typer.Option(help="Also score the bias rules with a reverse-engineered trigger.")
    ] = False,
    defender_fraction: float = 0.05,
    data_root: DataRoot = None,
    force: Force = False,
    arch: Arch = None,
    trust_code: TrustCode = False,
    clean: CleanPath = None,
    tune_fraction: TuneFraction = 0.6,
    seed: Annotated[int, seed_option("With --clean: seed of the holdout split.")] = 0,
    normalize: Normalize = None,
    num_classes: NumClasses = None,
    sample_rate: SampleRate = None,
    classes: Classes = None,
    allow_missing_classes: AllowMissingClasses = False,
    attack: Annotated[
        str | None, typer.Option(help="With --clean: the attack whose trigger to inspect.")
    ] = None,
    settings: Settings = None,
    target: Annotated[int | None, typer.Option(help="With --attack: its target label.")] = None,
    target_mode: Annotated[TargetMode, typer.Option()] = TargetMode.all_to_one,
) -> None:
    """Per-neuron diagnostics with the attack's TRUE trigger (a research view, not a defense):
    neuron table, ℓ∞-vs-ℓ1 bias plot, gradient norms by neuron group, Fine-Pruning curve, and
    the neuron-identification benchmark (ROC-AUC and precision@k of every scoring rule)."""
    from torchpurify import diagnostics
    from torchpurify.card import targeting
    from torchpurify.experiment import trigger_of
    from torchpurify.neurons import invert_triggers
    from torchpurify.neurons.inversion import value_range_of
    from torchpurify.outputs import check_output, staged_output

    check_output(out_dir, "inspect", force)
    net, card, holdout = _model_and_holdout(
        model, data_root, defender_fraction, arch=arch, trust_code=trust_code, clean=clean,
        tune_fraction=tune_fraction, seed=seed if clean is not None else None,
        normalize=normalize, num_classes=num_classes, sample_rate=sample_rate, classes=classes,
        allow_missing_classes=allow_missing_classes,
    )  # fmt: skip
    if attack is not None or settings or target is not None:
        from torchpurify.api import trigger_for

        trigger = trigger_for(
            attack, parse_settings(settings), card.input_shape, target, card.num_classes, False
        )
        how = targeting({"target": target, "target_mode": target_mode.value}, card.num_classes)
    else:
        trigger, how = trigger_of(card), card.how
    if trigger is None:
        raise UserError(
            f"{model} records no attack: inspect needs the trigger (--attack NAME --set k=v "
            "--target T)"
        )
    table = diagnostics.neuron_table(net, holdout, trigger, layer=layer)
    curve = diagnostics.pruning_curve(net, holdout, trigger, how.target, layer=layer, mode=how.mode)
    inverted_trigger = None
    if inverted:
        inversion = invert_triggers(net, holdout, value_range=value_range_of(holdout.x))
        label = inversion.target
        if label is None:
            label = inversion.labels[int(inversion.anomaly_index.argmax())]
        inverted_trigger = inversion.trigger(label)
    identification = diagnostics.neuron_identification(
        net, holdout, trigger, layer=layer, inverted_trigger=inverted_trigger
    )
    with staged_output(out_dir, "inspect", force) as folder:
        diagnostics.write_csv(table, folder / "neurons.csv")
        diagnostics.plot_bias(table, folder / "bias.png")
        diagnostics.plot_gradient_groups(table, folder / "gradient_groups.png")
        diagnostics.write_csv(curve, folder / "pruning_curve.csv")
        diagnostics.plot_pruning_curve(curve, folder / "pruning_curve.png")
        (folder / "identification.json").write_text(json.dumps(identification, indent=2) + "\n")
    summary = Table(
        title=f"neuron identification — {identification['layer']}, "
        f"{identification['channels']} channels, top {identification['k']} by true-trigger bias"
    )
    for column in ("scoring rule", "trigger", "ROC-AUC", "precision@k"):
        summary.add_column(column, justify="right")
    for name, rule in identification["rules"].items():
        summary.add_row(
            name, rule["trigger"], f"{rule['auc']:.3f}", f"{rule['precision_at_k']:.3f}"
        )
    out.print(summary)
    out.print(
        f"wrote neurons.csv, bias.png, gradient_groups.png, pruning_curve.png/.csv, "
        f"identification.json to {out_dir} (true trigger: research diagnostics only)"
    )


class Listing(str, Enum):
    datasets = "datasets"
    models = "models"
    attacks = "attacks"
    defenses = "defenses"


def _one_second_clip(path: Path | None, rate: int) -> tuple[Any, list[str]]:
    """The clip trigger-demo shows, as float32 mono at ``rate``, and notes on what was done to it.

    A WAV at another rate is resampled and several channels are averaged; the clip keeps its
    first second or is centred in one second of silence.
    """
    import math

    import numpy as np
    import soundfile

    if path is None:
        from torchpurify.data.synth import speak

        clip, notes = speak("yes", sample_rate=rate), ["the word 'yes', synthesised"]
    else:
        if not path.is_file():
            raise UserError(f"--input {path} does not exist; give a WAV file")
        try:
            data, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
        except RuntimeError as error:
            raise UserError(f"--input {path} is not a readable audio file ({error})") from None
        if data.size == 0:
            raise UserError(f"--input {path} has no samples")
        clip, notes = data.mean(axis=1), [str(path)]
        if data.shape[1] > 1:
            notes.append(f"averaged {data.shape[1]} channels to mono")
        if file_rate != rate:
            from scipy.signal import resample_poly

            common = math.gcd(rate, file_rate)
            clip = resample_poly(clip, rate // common, file_rate // common)
            notes.append(f"resampled from {file_rate} Hz")
    if len(clip) > rate:
        clip = clip[:rate]
        notes.append("kept its first second")
    elif len(clip) < rate:
        room = rate - len(clip)
        clip = np.pad(clip, (room // 2, room - room // 2))
        notes.append("centred in one second of silence")
    return np.clip(clip, -1, 1).astype(np.float32), notes


@command("trigger-demo")
def trigger_demo(
    attack: Annotated[str, typer.Option(help="Audio attack (see `torchpurify list attacks`).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the WAV and PNG files.")],
    input_path: Annotated[
        Path | None,
        typer.Option(
            "--input",
            help="A WAV file: other sample rates are resampled, channels averaged, and the clip "
            "cut or padded to one second (default: the word 'yes', synthesised).",
        ),
    ] = None,
    settings: Settings = None,
    seed: Annotated[int, seed_option("Seed of the trigger's random pattern.")] = 0,
    force: Force = False,
) -> None:
    """Apply an audio trigger to a one-second clip: write clean.wav, triggered.wav (16-bit PCM)
    and their log-magnitude spectrograms clean.png, triggered.png (one colour scale)."""
    import torch

    from torchpurify.attacks import ATTACKS, build_attack
    from torchpurify.attacks.audio import audio_attack_names, fft_size
    from torchpurify.outputs import check_output, staged_output

    ATTACKS.get(attack)
    audio = audio_attack_names()
    if attack not in audio:
        raise UserError(
            f"trigger-demo shows audio triggers and {attack!r} is an image attack; "
            f"choose one of: {', '.join(audio)}"
        )
    params = parse_settings(settings)
    rate = params.get("sample_rate", 16000)
    # A bad sample_rate cannot size the clip; build with 16000 samples so the attack's own check
    # names it.
    valid_rate = isinstance(rate, int) and not isinstance(rate, bool) and rate > 0
    trigger = build_attack(attack, (rate if valid_rate else 16000,), seed=seed, **params)
    check_output(out_dir, "trigger-demo", force)
    clip, notes = _one_second_clip(input_path, rate)
    clean = torch.from_numpy(clip)
    waves = {"clean": clean, "triggered": trigger(clean)}

    n_fft = fft_size(rate)
    window = torch.hann_window(n_fft)

    def decibels(wave: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(wave, n_fft, n_fft // 4, window=window, return_complex=True)
        return 20 * spectrum.abs().clamp_min(1e-5).log10()

    spectrograms = {name: decibels(wave) for name, wave in waves.items()}
    top = max(float(db.max()) for db in spectrograms.values())
    written = []
    with staged_output(out_dir, "trigger-demo", force) as folder:
        for name, wave in waves.items():
            written += _demo_files(folder, name, wave, rate, spectrograms[name], top, attack)
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    out.print(f"clip: {', '.join(notes)}; {rate} Hz, 1 s", **plain)
    out.print(f"wrote {', '.join(written)} to {out_dir}", **plain)


def _demo_files(folder: Path, name: str, wave, rate: int, decibels, top: float, attack: str):
    """``NAME.wav`` (16-bit PCM) and ``NAME.png``, its spectrogram on the shared colour scale."""
    import soundfile
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    soundfile.write(folder / f"{name}.wav", wave.numpy(), rate, subtype="PCM_16")
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(
        decibels.numpy(),
        origin="lower",
        aspect="auto",
        extent=(0.0, len(wave) / rate, 0.0, rate / 2),
        vmin=top - 80,
        vmax=top,
        cmap="magma",
    )
    axes.set_xlabel("time (s)")
    axes.set_ylabel("frequency (Hz)")
    axes.set_title(name if name == "clean" else f"triggered: {attack}")
    figure.colorbar(image, ax=axes, label="magnitude (dB)")
    figure.savefig(folder / f"{name}.png", dpi=120)
    return [f"{name}.wav", f"{name}.png"]


@command()
def report(
    db: Annotated[
        Path | None, typer.Argument(help="The results store (SQLite) the runner wrote.")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for report.md, report.html and the figures."),
    ] = None,
    force: Force = False,
    readme: Annotated[
        Path | None,
        typer.Option(
            help="Instead: rebuild the results tables of this Markdown file (each marked "
            "<!-- results: STORE model=M labels=A,B -->) from their stores."
        ),
    ] = None,
    check_only: Annotated[
        bool, typer.Option("--check", help="With --readme: change nothing, fail if it differs.")
    ] = False,
) -> None:
    """Tables and plots of a results store: report.md (figures beside it) and report.html
    (one self-contained page: images embedded, no external resources). With --readme, the
    README's results tables from the stores they name."""
    if readme is not None:
        from torchpurify.report import sync_readme

        stores = sync_readme(readme, check_only=check_only)
        verb = "matches" if check_only else "rebuilt from"
        print(f"{readme}: {len(stores)} table(s) {verb} {', '.join(sorted(set(stores)))}")
        return
    if db is None or out_dir is None:
        raise UserError("report needs a results store and --out DIR (or --readme FILE)")
    from torchpurify.report import write_report

    for path in write_report(db, out_dir, force=force):
        print(path)


class Executor(str, Enum):
    local = "local"
    ray = "ray"


@command("run")
def run_spec(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="The experiment spec.")],
    results: Annotated[
        Path, typer.Option(help="The results store (SQLite); created on first use.")
    ] = Path("results.db"),
    cache: Annotated[Path, typer.Option(help="Folder for the trained models.")] = Path(
        "runs/cache"
    ),
    executor: Annotated[
        Executor, typer.Option(help="local: in this process; ray: tasks on a Ray cluster.")
    ] = Executor.local,
    cpus_per_task: Annotated[
        int | None, typer.Option(help="CPUs per Ray task (default: the spec's, else 1).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a line per finished cell.")] = True,
) -> None:
    """Run an experiment spec: train each model once, run every defense on it, store each
    result in --results. Run the same command again to resume; finished cells are skipped."""
    from torchpurify.spec import load_spec

    spec = load_spec(spec_path)  # a mistake is refused before torch is imported
    from torchpurify.runner import print_summary, run_experiment

    try:
        rows = run_experiment(
            spec, results, cache, executor.value, progress, cpus_per_task, console=out
        )
    except KeyboardInterrupt:
        err.print(f"interrupted; finished cells are in {results}: run the same command to resume")
        raise typer.Exit(130) from None
    if not progress:
        print_summary(out, rows)
    out.print(f"results: {results}")


@command()
def retire(
    results: Annotated[Path, typer.Option(help="The results store to retire models from.")],
    archive: Annotated[
        Path, typer.Option(help="The store that receives them (created on first use).")
    ],
    cache: Annotated[
        Path | None,
        typer.Option(
            help="Retire every model whose weights this cache lacks or holds with "
            "another hash than the store recorded."
        ),
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="A model key to retire (repeatable).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Say what would move; change nothing.")] = False,
) -> None:
    """Move models and every cell measured on them from a results store into an archive store,
    so `run` can train them afresh under the same keys: for results whose weights are lost
    (another machine's arithmetic gives other weights, and a cell never attaches to weights
    with another hash). Nothing is deleted that the archive does not hold."""
    from torchpurify.runner import lost_models
    from torchpurify.store import Store

    if not results.is_file():
        raise UserError(f"{results} does not exist; give the results store the runner wrote")
    if cache is None and not model:
        raise UserError("name the models to retire: --model KEY, or --cache DIR for the lost ones")
    if cache is not None and not cache.is_dir():
        raise UserError(f"--cache {cache} is not a folder; give the cache the runner trained into")
    with Store(results) as store:
        chosen = {key: "named" for key in model or []}
        if cache is not None:
            chosen.update(lost_models(store, cache))
        known = {row["key"] for row in store.models()}
        unknown = sorted(set(chosen) - known)
        if unknown:
            raise UserError(f"{results} has no model {unknown[0]}")
        cells = [c for c in store.cells() if c["model_key"] in chosen]
        for key, why in sorted(chosen.items()):
            count = sum(c["model_key"] == key for c in cells)
            print(f"{key[:12]}…  {count} cells  ({why})")
        if not chosen:
            print(f"nothing to retire: every model of {results} has its weights in {cache}")
            return
        if dry_run:
            print(f"dry run: {len(chosen)} models and {len(cells)} cells would move to {archive}")
            return
        leases = store.live_leases()  # a runner at work would train or store under these keys
        if leases:
            raise UserError(
                f"a runner is working on {results} ({len(leases)} live leases); "
                "retire when it has stopped"
            )
        with Store(archive) as target:
            moved = store.retire(chosen, target)
    print(f"moved {moved[0]} models and {moved[1]} cells from {results} to {archive}")


@command("make-speech")
def make_speech(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder to write; it must not exist or be empty.")
    ],
    per_word: Annotated[int, typer.Option(help="Clips per keyword.")] = 1200,
    seed: Annotated[int, seed_option("Seed of every random choice.")] = 0,
    workers: Annotated[
        int | None, typer.Option(help="Processes synthesising (default: one per CPU core).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Synthesise the speech-synth keyword dataset (Speech Commands layout) with espeak-ng;
    use it with --dataset speech-synth --data-root DIR."""
    from torchpurify.data.synth import generate_speech_synth

    record = generate_speech_synth(
        out_dir, per_word=per_word, seed=seed, workers=workers, progress=progress
    )
    out.print(f"wrote {record['clips']} clips to {out_dir}", highlight=False)


@command("list")
def list_(
    what: Annotated[Listing, typer.Argument(help="datasets, models, attacks or defenses")],
) -> None:
    """List the registered datasets, models, attacks or defenses."""
    from torchpurify import catalogue  # the registries' copy: no torch to import

    table = Table(title=what.value)
    table.add_column("name")
    table.add_column("description")
    for name, summary in catalogue.listed(what.value).items():
        table.add_row(name, summary)
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
