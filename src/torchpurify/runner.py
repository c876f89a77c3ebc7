"""Run an experiment spec: train each model once, run every defense cell, record both.

Models are trained with :func:`~torchpurify.experiment.train_model` and cached in
``cache/<model key>/``; every cell is one :func:`~torchpurify.experiment.purify_model` call. A
row reaches the store only when its work has finished, so an interrupted run is resumed by
running it again: finished cells are skipped, a half-done cell is redone, nothing is counted
twice. Two executors: ``local`` (in this process, one thing at a time) and ``ray`` (models and
cells as Ray tasks; only this process writes to the store).

Several ``run`` processes may share one store and cache: each claims a model or a cell (a lease
in the store, kept alive by a heartbeat) before working on it and skips what another holds, so
they split the grid; at the end each waits for the others' cells, taking over any whose runner
died. Staging folders left in the cache by a killed save are swept at the start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from torchpurify import diagnostics
from torchpurify.attacks import build_attack
from torchpurify.card import targeting
from torchpurify.data import load_dataset
from torchpurify.errors import UserError, check
from torchpurify.experiment import defender_data, purify_model, train_model, trigger_of
from torchpurify.models import build_model
from torchpurify.models.io import CARD, WEIGHTS, load_model, versions, weights_sha256
from torchpurify.outputs import check_writable, sweep_staging
from torchpurify.report import fmt, mean_std
from torchpurify.spec import CellJob, ExperimentSpec, ModelJob, attack_name, cell_jobs, model_jobs
from torchpurify.store import Runner, Store, model_lease, utc_now
from torchpurify.train import resolve_device

EXECUTORS = ("local", "ray")
# The backdoor estimate before purification, computed once per model (methods.md §12).
ESTIMATE_FILE = "estimate-before.json"
RAY_MISSING = "the ray executor needs Ray; install the extra: pip install 'torchpurify[ray]'"
# Ray tasks print nothing here (their progress stays in the workers): while none finishes, the
# driver says what is still running at most this often, so a log shows the run is alive.
HEARTBEAT_SECONDS = 30.0
# Training in a grid runs on this many intra-op threads whatever the executor, the CPUs of a
# task or --threads: reductions split over another number of threads round differently, and
# the same spec must give bit-identical weights (one SHA-256) wherever it is trained.
TRAINING_THREADS = 1


@dataclass
class ModelStage:
    """A model of the grid and what it still needs: ``train``, ``diagnose``, ``adopt`` (a cached
    folder the store has no row for — a new store on an old cache) or nothing."""

    job: ModelJob
    folder: Path
    action: str | None
    row: dict[str, Any] | None  # the store's row, when there is one


@dataclass
class Work:
    """What a run still has to do, and how: the executors' whole input."""

    spec: ExperimentSpec
    models: list[ModelStage]
    cells: list[CellJob]  # the cells not yet in the store
    cache: Path
    spec_hash: str
    cpus_per_task: int
    progress: bool

    def cells_of(self, key: str) -> list[CellJob]:
        return [cell for cell in self.cells if cell.model.key == key]


def run_experiment(
    spec: ExperimentSpec,
    results: str | Path,
    cache: str | Path,
    executor: str = "local",
    progress: bool = True,
    cpus_per_task: int | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Run every cell of ``spec`` not yet in the store at ``results``; return all its cell rows.

    With ``progress``, one line per trained model and per finished cell, and the summary table
    (:func:`print_summary`) at the end, go to ``console`` (default: stderr).
    """
    check(executor in EXECUTORS, f"--executor must be local or ray, got {executor!r}")
    check(
        cpus_per_task is None or cpus_per_task >= 1,
        f"--cpus-per-task must be at least 1, got {cpus_per_task}",
    )
    console = console or Console(stderr=True)
    cache = Path(cache).resolve()
    check_writable(cache, "--cache")
    models = model_jobs(spec)
    cells = cell_jobs(spec, models)
    if not Path(results).exists():
        check_grid(spec)  # before the results file is created: a bad spec leaves nothing behind
        checked = True
    else:
        checked = False
    with Store(results) as store, store.runner() as runner:
        sweep_staging(cache, keep=_models_in_work(store))
        pending = [cell for cell in cells if not store.has_cell(cell.key)]
        work = Work(
            spec=spec,
            models=[stage_of(spec, job, cache, pending, store) for job in models],
            cells=pending,
            cache=cache,
            spec_hash=spec.hash(),
            cpus_per_task=cpus_per_task or spec.cpus_per_task,
            progress=progress and executor == "local",
        )
        report = Reporter(console if progress else None, len(cells), len(cells) - len(pending))
        report.start(store.path, sum(stage.action == "train" for stage in work.models))
        if pending or any(stage.action for stage in work.models):
            if not checked:
                check_grid(spec)
            if executor == "ray":
                run_ray(work, store, runner, report)
            run_local(work, store, runner, report)  # after Ray: what others left, if anything
        report.finish()
        rows = store.cells(cell.key for cell in cells)
    if progress:
        print_summary(console, rows)
    return rows


def _models_in_work(store: Store) -> set[str]:
    """Model keys a live runner is training: their staging folders are not stale."""
    prefix = model_lease("")
    return {key[len(prefix) :] for key in store.live_leases() if key.startswith(prefix)}


def stage_of(
    spec: ExperimentSpec, job: ModelJob, cache: Path, pending: list[CellJob], store: Store
) -> ModelStage:
    """Reuse a cached model when its folder and its row are both there; adopt a cached folder
    without a row (a new store sharing a cache: the folder's name is the job's key, written
    only when complete); else train it."""
    folder = cache / job.key
    row = store.model(job.key)
    needs_diagnostics = (
        spec.diagnostics and job.attack is not None and (row or {}).get("identification") is None
    )
    if row is None:
        action = "adopt" if (folder / CARD).is_file() else "train"
    elif not (folder / CARD).is_file():
        needed = needs_diagnostics or any(cell.model.key == job.key for cell in pending)
        action = "train" if needed else None
    else:
        action = "diagnose" if needs_diagnostics else None
    return ModelStage(job, folder, action, row)


def check_grid(spec: ExperimentSpec) -> None:
    """Checks that need the data: every attack and model must fit its dataset's inputs."""
    for d, dataset in enumerate(spec.datasets):
        data = load_dataset(dataset.name, root=dataset.root)
        shape, classes = data.input_shape, data.num_classes
        own = f"datasets[{d}]."
        attacks_place = own + "attacks" if dataset.attacks else "attacks"
        for i, attack in enumerate(dataset.attacks or spec.attacks):
            if attack is None:
                continue
            place = f"{spec.source}: {attacks_place}[{i}]"
            check(
                attack.target < classes,
                f"{place}.target: {dataset.name} has labels 0..{classes - 1}, got {attack.target}",
            )
            try:
                build_attack(attack.name, shape, **attack.params)
            except UserError as error:
                raise UserError(f"{place}.params: {error} (on {dataset.name})") from None
        models_place = own + "models" if dataset.models else "models"
        for i, model in enumerate(dataset.models or spec.models):
            try:
                build_model(model, shape, classes)
            except UserError as error:
                raise UserError(f"{spec.source}: {models_place}[{i}]: {error}") from None


# ----------------------------------------------------------------------------- the two stages


def prepare_model(
    stage: ModelStage, spec: ExperimentSpec, progress: bool = False
) -> dict[str, Any]:
    """Train (or load) a model and compute its diagnostics; return its store row."""
    job = stage.job
    if stage.action == "train":
        config = job.train_config(spec.device, progress)
        result = train_model(
            job.data_spec(), job.model, job.attack, config, out=stage.folder,
            threads=TRAINING_THREADS,
        )  # fmt: skip
        model, card = result.model, result.card
        row = model_row(job, stage.folder, card)
        check_same_weights(stage.row, row["weights_sha256"], job.name)
    else:
        # The spec names the architecture, so a module:function in it is the user's own.
        model, card = load_model(stage.folder, job.model)
        if stage.action == "adopt":
            row = model_row(job, stage.folder, card)
        else:
            digest = weights_sha256(stage.folder)
            check_same_weights(stage.row, digest, job.name)
            row = {**stage.row, "path": str(stage.folder), "weights_sha256": digest}
    if spec.diagnostics and card.get("attack"):
        row.update(diagnose(model, card, job, spec))
    return row


def job_columns(job: ModelJob) -> dict[str, Any]:
    """The columns models and cells share: which data, architecture, attack and seed."""
    attack = job.attack
    return {
        "dataset": job.dataset.name,
        "model": job.model,
        "attack": attack_name(attack),
        "attack_params": attack.params if attack else {},
        "poison_rate": attack.poison_rate if attack else None,
        "target_mode": attack.target_mode if attack else None,
        "seed": job.seed,
    }


def check_same_weights(row: dict[str, Any] | None, digest: str, name: str) -> None:
    """Refuse weights other than those the store's row recorded: a result never attaches to
    weights with another hash. Rows stored before hashes were recorded have none to compare."""
    recorded = (row or {}).get("weights_sha256")
    if recorded is not None and recorded != digest:
        raise UserError(
            f"{name}: the model's weights (sha256 {digest[:12]}…) are not those the results "
            f"store recorded (sha256 {recorded[:12]}…), so its stored cells were measured on "
            "other weights; restore the cached model folder, give a new --results store, or "
            "move its results aside with `torchpurify retire`"
        )


def lost_models(store: Store, cache: str | Path) -> dict[str, str]:
    """Model key → why: the store's models whose weights the cache no longer holds (no folder)
    or holds with another hash than the store recorded — the models whose stored cells no
    cached weights can reproduce (``torchpurify retire``)."""
    lost = {}
    for row in store.models():
        folder = Path(cache) / row["key"]
        if not (folder / WEIGHTS).is_file():
            lost[row["key"]] = f"no weights under {folder}"
        elif row.get("weights_sha256") and weights_sha256(folder) != row["weights_sha256"]:
            lost[row["key"]] = f"the weights under {folder} have another hash"
    return lost


def model_row(job: ModelJob, folder: Path, card: dict[str, Any]) -> dict[str, Any]:
    metrics = card["metrics"]
    return {
        "key": job.key,
        **job_columns(job),
        "target": job.attack.target if job.attack else None,
        "train_recipe": job.recipe,
        "path": str(folder),
        "acc": metrics["acc"],
        "asr": metrics.get("asr"),
        "ra": metrics.get("ra"),
        "train_seconds": card["training"]["seconds"],
        "identification": None,
        "neuron_table": None,
        "pruning_curve": None,
        "created_at": utc_now(),
        "weights_sha256": weights_sha256(folder),
        "versions": {**versions(), "numpy": np.__version__},
    }


def diagnose(model, card: dict[str, Any], job: ModelJob, spec: ExperimentSpec) -> dict[str, Any]:
    """Neuron identification, neuron table and Fine-Pruning curve (mean-activation order) on
    the defender's clean holdout, with the attack's true trigger (research views, methods §8)."""
    _, holdout, _ = defender_data(
        card, root=job.dataset.root, fraction=spec.defender_fraction, progress=False
    )
    trigger = trigger_of(card)
    how = targeting(card["attack"], len(card["classes"]))
    model = model.to(resolve_device(spec.device))
    curve = diagnostics.pruning_curve(model, holdout, trigger, how.target, mode=how.mode)
    return {
        "identification": diagnostics.neuron_identification(model, holdout, trigger),
        "neuron_table": diagnostics.neuron_table(model, holdout, trigger),
        "pruning_curve": curve,
    }


def run_cell(
    cell: CellJob, model: dict[str, Any], spec: ExperimentSpec, spec_hash: str,
    progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Purify the cell's model (``model`` is its store row) with the cell's defense; the row."""
    started = utc_now()
    digest = weights_sha256(model["path"])  # the weights this cell purifies, by their hash
    check_same_weights(model, digest, cell.model.name)
    net, card = load_model(model["path"], cell.model.model)
    defense = cell.defense.build(cell.model.seed, spec.device, progress)
    result = purify_model(
        net, card, defense, root=cell.model.dataset.root, defender_fraction=cell.defender_fraction,
        estimate=spec.estimate_config(), estimate_cache=Path(model["path"]) / ESTIMATE_FILE,
    )  # fmt: skip
    record = result.card["defense"]
    guess = result.estimate
    return {
        "key": cell.key,
        "spec_hash": spec_hash,
        "model_key": cell.model.key,
        **job_columns(cell.model),
        "defense": cell.defense.name,
        "label": cell.label,
        "defense_params": record["params"],
        "run_context": record["context"],
        "guard_settings": record["guard_settings"],
        "defender_fraction": cell.defender_fraction,
        **{f"{m}_before": getattr(result.before, m) for m in ("acc", "asr", "ra")},
        **{f"{m}_after": getattr(result.after, m) for m in ("acc", "asr", "ra")},
        "der": result.der,
        "seconds": record["seconds"],
        "forward_passes": record["forward_passes"],
        "backward_passes": record["backward_passes"],
        "log": record["log"],
        "versions": {**versions(), "numpy": np.__version__},
        "started_at": started,
        "finished_at": utc_now(),
        "estimate": guess,
        "est_asr_before": guess["before"]["est_asr"] if guess else None,
        "est_asr_after": guess["after"]["est_asr"] if guess else None,
        "weights_sha256": digest,
    }


# ----------------------------------------------------------------------------- executors


def run_local(work: Work, store: Store, runner: Runner, report: Reporter) -> None:
    """In this process: each model (when it needs work), then its pending cells — skipping what
    another runner has claimed, then waiting for it (and taking over from a dead one)."""
    poll = min(5.0, store.lease_seconds / 4)
    while True:
        elsewhere = 0
        for job in (stage.job for stage in work.models):
            cells = [cell for cell in work.cells_of(job.key) if not store.has_cell(cell.key)]
            row = ready_model(job, cells, work, store, runner, report)
            if row is False:  # nothing to do for this model
                continue
            if row is None:  # another runner is training it
                elsewhere += len(cells) or 1
                continue
            for cell in cells:
                if not runner.claim(cell.key):
                    elsewhere += 1
                    continue
                if store.has_cell(cell.key):  # finished by another runner a moment ago
                    runner.release(cell.key)
                    continue
                result = run_cell(cell, row, work.spec, work.spec_hash, work.progress)
                store.add_cell(result)
                report.cell(result)
        if not elsewhere:
            return
        report.waiting(elsewhere)
        time.sleep(poll)


def ready_model(
    job: ModelJob, cells: list[CellJob], work: Work, store: Store, runner: Runner,
    report: Reporter,
) -> dict[str, Any] | None | bool:  # fmt: skip
    """The model's store row with its folder, training or diagnosing it first when needed;
    None while another runner holds it, False when neither it nor ``cells`` need work."""
    stage = stage_of(work.spec, job, work.cache, cells, store)
    if stage.action is None:
        return {**stage.row, "path": str(stage.folder)} if cells else False
    if not runner.claim(model_lease(job.key)):
        return None
    stage = stage_of(work.spec, job, work.cache, cells, store)  # it may have finished meanwhile
    if stage.action is None:
        runner.release(model_lease(job.key))
        return {**stage.row, "path": str(stage.folder)} if cells else False
    sweep_staging(work.cache, only=job.key)  # a dead runner's half-saved copy, now ours to clear
    row = prepare_model(stage, work.spec, work.progress)
    store.add_model(row)  # ends the lease
    report.model(stage, row)
    return {**row, "path": str(stage.folder)}


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def in_worker(function: Callable, threads: int, *args) -> Any:
    """Run ``function`` in a Ray worker with torch limited to the task's CPUs."""
    import torch

    torch.set_num_threads(threads)
    return function(*args)


def run_ray(work: Work, store: Store, runner: Runner, report: Reporter) -> None:
    """Models and cells as Ray tasks (a cell waits for its model); this process writes rows.
    Models and cells another runner holds are left to :func:`run_local` afterwards."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        # Connects to the cluster in RAY_ADDRESS when set, else starts a local one.
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        device = work.spec.device
        gpus = device.startswith("cuda") or (
            device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
        )
        task = ray.remote(in_worker).options(num_cpus=work.cpus_per_task, num_gpus=int(gpus))
        threads = work.cpus_per_task
        jobs, model_refs, stages = {}, {}, {}
        for stage in work.models:
            if stage.action and not runner.claim(model_lease(stage.job.key)):
                continue  # another runner trains it
            stages[stage.job.key] = stage
            if stage.action:
                ref = task.remote(prepare_model, threads, stage, work.spec)
                model_refs[stage.job.key] = ref
                jobs[ref] = stage
        for cell in work.cells:
            if cell.model.key not in stages or not runner.claim(cell.key):
                continue
            stage = stages[cell.model.key]
            model = model_refs.get(cell.model.key) or {**stage.row, "path": str(stage.folder)}
            ref = task.remote(run_cell, threads, cell, model, work.spec, work.spec_hash)
            jobs[ref] = cell
        collect(ray, jobs, model_refs, store, report)
    finally:
        if started_here:
            ray.shutdown()


def collect(ray, jobs: dict, model_refs: dict, store: Store, report: Reporter) -> None:
    """Write each task's row as it finishes, a cell's model row always first. On a failure or
    an interruption the tasks still running are cancelled."""
    written: set[str] = set()
    pending = list(jobs)

    def write_model(key: str) -> None:
        if key in model_refs and key not in written:
            store.add_model(ray_result(ray, model_refs[key]))
            written.add(key)
            report.model(jobs[model_refs[key]], store.model(key))

    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=HEARTBEAT_SECONDS)
            if not done:
                report.alive([jobs[ref] for ref in pending])
            for ref in done:
                job = jobs[ref]
                if isinstance(job, ModelStage):
                    write_model(job.job.key)
                else:
                    write_model(job.model.key)
                    row = ray_result(ray, ref)
                    store.add_cell(row)
                    report.cell(row)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def ray_result(ray, ref) -> dict[str, Any]:
    """A task's result; a user mistake inside the task is re-raised as the one-line error."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise


# ----------------------------------------------------------------------------- reporting


class Reporter:
    """Progress lines: one per trained model and one per finished cell (silent without console)."""

    def __init__(self, console: Console | None, total: int, done: int) -> None:
        self.console, self.total, self.done = console, total, done
        self.ran = 0  # cells this process ran
        self.waited = False
        self.last = time.monotonic()  # when the run started or last reported a result

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def start(self, path: Path, training: int) -> None:
        self.say(
            f"{path}: {self.total} cells, {self.done} already done; {training} models to train"
        )

    def model(self, stage: ModelStage, row: dict[str, Any]) -> None:
        self.last = time.monotonic()
        verb = {"train": "trained", "adopt": "adopted from the cache"}.get(
            stage.action, "diagnosed"
        )
        self.say(
            f"{verb} {stage.job.name}: ACC {fmt(row['acc'])}  ASR {fmt(row['asr'])}  "
            f"{row['train_seconds']:.1f} s"
        )
        old = stage.row
        if stage.action == "train" and old and (old["acc"], old["asr"]) != (row["acc"], row["asr"]):
            # The store knew this model but its cached folder was gone: training is not
            # bit-for-bit reproducible across machines and thread counts.
            self.say(
                f"warning: {stage.job.name} was retrained (its cached folder was missing) and "
                f"differs from the stored model (ACC {old['acc']:.4f} → {row['acc']:.4f}, "
                f"ASR {old['asr'] or 0:.4f} → {row['asr'] or 0:.4f}); the cells stored before were "
                "measured on the earlier model (each cell keeps its own ACC/ASR before)"
            )

    def waiting(self, elsewhere: int) -> None:
        if not self.waited:
            self.say(f"{elsewhere} cells or models are claimed by another runner; waiting for them")
            self.waited = True

    def alive(self, running: list) -> None:
        """A timestamped line while Ray tasks run and none has finished: what is left, and
        how long since the run (or its last result) started."""
        now = time.monotonic()
        models = sum(isinstance(job, ModelStage) for job in running)
        left = [f"{models} models to train"] if models else []
        left.append(f"{len(running) - models} cells running or queued")
        self.say(
            f"{time.strftime('%H:%M:%S')} still working: {', '.join(left)}; "
            f"{self.done}/{self.total} cells done, {now - self.last:.0f} s since the last result"
        )

    def finish(self) -> None:
        self.say(f"this runner ran {self.ran} cells")

    def cell(self, row: dict[str, Any]) -> None:
        self.last = time.monotonic()
        self.done += 1
        self.ran += 1
        self.say(
            f"[{self.done}/{self.total}] {row['dataset']}/{row['model']}/{row['attack']}/"
            f"seed {row['seed']} {row['label']}: "
            f"ACC {fmt(row['acc_before'])}→{fmt(row['acc_after'])}  "
            f"ASR {fmt(row['asr_before'])}→{fmt(row['asr_after'])}  "
            f"DER {fmt(row['der'])}  est. ASR {fmt(row.get('est_asr_before'))}→"
            f"{fmt(row.get('est_asr_after'))}  {row['seconds']:.1f} s"
        )


SUMMARY_COLUMNS = {
    "ACC before": "acc_before", "ASR before": "asr_before", "ACC after": "acc_after",
    "ASR after": "asr_after", "DER": "der", "seconds": "seconds",
}  # fmt: skip


def summary_table(rows: list[dict[str, Any]], title: str = "mean ± std over seeds") -> Table:
    """One line per dataset / model / attack / defense label, in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["dataset"], row["model"], row["attack"], row["label"])
        groups.setdefault(key, []).append(row)
    table = Table(title=title)
    for column in ("dataset", "model", "attack", "defense", "seeds"):
        table.add_column(column)
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="right")
    for key, members in groups.items():
        cells = [mean_std([m[c] for m in members]) for c in SUMMARY_COLUMNS.values()]
        table.add_row(*key, str(len(members)), *cells)
    return table


def print_summary(console: Console, rows: list[dict[str, Any]]) -> None:
    """The summary table; at full width when the output is a log or a pipe, not a terminal."""
    if not console.is_terminal:
        console = Console(file=console.file, width=200)  # a log's width is not 80 columns
    console.print(summary_table(rows))
