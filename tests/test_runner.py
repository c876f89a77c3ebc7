"""The experiment runner: models trained once, every cell stored once, interrupted runs resumed,
the Ray executor, and `torchpurify run`."""

import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from torchpurify import runner
from torchpurify import store as store_module
from torchpurify.cli import app
from torchpurify.errors import UserError
from torchpurify.spec import cell_jobs, load_spec
from torchpurify.store import Store

# digits × small-cnn × {clean, BadNets} × 2 seeds = 4 models; × 2 defenses = 8 cells.
SPEC = """
datasets: [digits]
models: [small-cnn]
attacks:
  - none
  - name: badnets
    params: {size: 2}
defenses:
  - name: ft
    params: {epochs: 1}
  - name: fine-pruning
    label: pruning
    params: {prune_only: true}
seeds: [0, 1]
training: {epochs: 1, batch_size: 64}
defender_fraction: 0.2
diagnostics: true
device: cpu
estimate: {families: [mask]}
"""


def write_spec(folder, text=SPEC, name="spec.yaml"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def read(results, sql):
    with sqlite3.connect(results) as connection:
        return connection.execute(sql).fetchall()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny grid, run once without interruption."""
    folder = tmp_path_factory.mktemp("finished")
    spec = load_spec(write_spec(folder))
    rows = runner.run_experiment(spec, folder / "results.db", folder / "cache", progress=False)
    return spec, folder, rows


def test_every_cell_is_stored_once_with_its_results(finished):
    spec, folder, rows = finished
    results = folder / "results.db"
    assert len(rows) == 8
    assert {r["key"] for r in rows} == {c.key for c in cell_jobs(spec)}
    assert read(results, "SELECT COUNT(*), COUNT(DISTINCT key) FROM cells") == [(8, 8)]
    assert read(results, "SELECT COUNT(*) FROM models") == [(4,)]
    for row in rows:
        assert 0 <= row["acc_after"] <= 1 and row["seconds"] >= 0 and row["forward_passes"] > 0
        assert row["versions"]["numpy"] and row["run_context"]["seed"] == row["seed"]
        backdoored = row["attack"] == "badnets"
        assert (row["asr_before"] is not None) == backdoored == (row["der"] is not None)
    labels = {r["label"] for r in rows}
    assert labels == {"ft", "pruning"}


def sha256_of(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_model_and_cell_names_the_hash_of_its_weights_and_the_commit(finished):
    _, folder, rows = finished
    with Store(folder / "results.db") as store:
        models = {m["key"]: m for m in store.models()}
    for key, model in models.items():
        assert model["weights_sha256"] == sha256_of(folder / "cache" / key / "model.safetensors")
        assert model["versions"]["torch"] and model["versions"].get("commit")  # a git checkout
    for row in rows:
        assert row["weights_sha256"] == models[row["model_key"]]["weights_sha256"]
        assert row["versions"].get("commit")


def test_a_cell_never_attaches_to_weights_with_another_hash(finished, tmp_path, monkeypatch):
    """A cached model whose weights changed since the store recorded them (retrained elsewhere,
    copied over) is refused before any new cell runs on it."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, folder, _ = finished
    results, cache = tmp_path / "results.db", tmp_path / "cache"
    results.write_bytes((folder / "results.db").read_bytes())
    shutil.copytree(folder / "cache", cache)
    with Store(results) as store:  # the stored rows point at the copied cache
        for model in store.models():
            store.add_model({**model, "path": str(cache / model["key"])})
    (key,) = read(results, "SELECT key FROM models WHERE attack = 'badnets' AND seed = 0")[0]
    weights = cache / key / "model.safetensors"
    state = load_file(str(weights))
    first = next(iter(state))
    state[first] = state[first] + 1e-3  # other weights, same architecture
    save_file(state, str(weights))
    changed = load_spec(
        write_spec(
            tmp_path, SPEC.replace("epochs: 1}\n  - name: fine", "epochs: 2}\n  - name: fine")
        )
    )
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("retrained"))
    with pytest.raises(UserError, match="not those the results store recorded"):
        runner.run_experiment(changed, results, cache, progress=False)
    stored = read(
        results, "SELECT COUNT(*) FROM cells WHERE model_key = ?".replace("?", f"'{key}'")
    )
    assert stored == [(2,)]  # only the two cells of the first run: none on the changed weights


def test_retire_moves_the_results_of_lost_weights_aside_and_the_grid_reruns_them(
    finished, tmp_path
):
    """Weights lost (a model folder gone, another one's hash changed): `torchpurify retire
    --cache` moves exactly those models and their cells to the archive, every column kept; the
    same spec then retrains them under their keys and runs their cells afresh."""
    import shutil

    spec, folder, _ = finished
    results, cache, archive = tmp_path / "results.db", tmp_path / "cache", tmp_path / "old.db"
    results.write_bytes((folder / "results.db").read_bytes())
    shutil.copytree(folder / "cache", cache)
    keys = [k for (k,) in read(results, "SELECT key FROM models ORDER BY key")]
    shutil.rmtree(cache / keys[0])  # lost
    weights = cache / keys[1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # another hash
    before = {r[0]: r for r in read(results, "SELECT * FROM cells")}
    cli = CliRunner()
    dry = cli.invoke(app, ["retire", "--results", str(results), "--archive", str(archive),
                           "--cache", str(cache), "--dry-run"])  # fmt: skip
    assert dry.exit_code == 0 and "dry run: 2 models and 4 cells" in dry.output
    assert not archive.exists() and len(read(results, "SELECT key FROM cells")) == 8
    with Store(results) as store:  # a runner at work: nothing moves under it
        assert store.claim("some-cell", "another-runner")
        busy = cli.invoke(app, ["retire", "--results", str(results), "--archive", str(archive),
                                "--cache", str(cache)])  # fmt: skip
        assert busy.exit_code != 0 and "a runner is working on" in busy.output
        store.release("some-cell", "another-runner")
    done = cli.invoke(app, ["retire", "--results", str(results), "--archive", str(archive),
                            "--cache", str(cache)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "moved 2 models and 4 cells" in done.output and "another hash" in done.output
    moved = {r[0]: r for r in read(archive, "SELECT * FROM cells")}
    assert {r[2] for r in moved.values()} == {keys[0], keys[1]}  # model_key
    assert all(moved[k] == before[k] for k in moved)  # every column as it was
    assert sorted(k for (k,) in read(results, "SELECT key FROM models")) == keys[2:]
    again = cli.invoke(app, ["retire", "--results", str(results), "--archive", str(archive),
                             "--cache", str(cache)])  # fmt: skip
    assert "nothing to retire" in again.output
    unknown = cli.invoke(app, ["retire", "--results", str(results), "--archive", str(archive),
                               "--model", "nope"])  # fmt: skip
    assert unknown.exit_code == 2 and "has no model nope" in unknown.output
    typo = cli.invoke(app, ["retire", "--results", str(results), "--archive", str(archive),
                            "--cache", str(tmp_path / "cahce")])  # fmt: skip
    assert typo.exit_code == 2 and "is not a folder" in typo.output  # not "all of it is lost"
    # an archive that already holds a model (retired before) takes nothing: no row of it would
    # be replaced, and no cell dropped by INSERT OR IGNORE and then deleted here
    with Store(archive) as source, Store(tmp_path / "twice.db") as twice:
        twice.add_model(source.model(keys[0]))
        with pytest.raises(UserError, match="already holds"):
            source.retire([keys[0]], twice)
        assert source.model(keys[0]) is not None and len(source.cells()) == 4
    shutil.rmtree(cache / keys[1])  # the changed folder goes too, so the runner retrains it
    rows = runner.run_experiment(spec, results, cache, progress=False)
    assert len(rows) == 8 and len(read(results, "SELECT key FROM cells")) == 8
    fresh = {k for (k,) in read(results, "SELECT model_key FROM cells")}
    assert fresh == set(keys)


def test_training_gives_one_hash_whatever_the_callers_thread_count(tmp_path):
    """The runner trains with a fixed thread count and deterministic algorithms: the same job
    gives bit-identical weights when the caller runs 1 or 2 intra-op threads."""
    import torch

    from torchpurify.models.io import weights_sha256

    spec = load_spec(write_spec(tmp_path, SPEC.replace("seeds: [0, 1]", "seeds: [0]")))
    job = next(j for j in runner.model_jobs(spec) if j.attack is not None)
    hashes = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stage = runner.ModelStage(job, tmp_path / f"t{threads}", "train", None)
            row = runner.prepare_model(stage, spec)
            hashes.append(row["weights_sha256"])
            assert weights_sha256(tmp_path / f"t{threads}") == row["weights_sha256"]
            assert torch.get_num_threads() == threads  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert hashes[0] == hashes[1]


def test_models_are_cached_with_diagnostics_for_backdoored_ones(finished):
    _, folder, _ = finished
    with Store(folder / "results.db") as store:
        models = store.models()
    for model in models:
        assert (folder / "cache" / model["key"] / "model.json").is_file()
        assert model["path"] == str((folder / "cache" / model["key"]).resolve())
        if model["attack"] == "none":
            assert model["identification"] is None and model["asr"] is None
        else:
            assert set(model["identification"]["rules"]) >= {"mean-activation", "linf-bias"}
            assert model["neuron_table"][0]["backdoor"] in (True, False)
            assert model["pruning_curve"][0]["order"] == "mean-activation"


def test_a_second_run_does_nothing_but_report(finished, monkeypatch):
    spec, folder, rows = finished

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run must not train or purify again")

    monkeypatch.setattr(runner, "train_model", no_work)
    monkeypatch.setattr(runner, "purify_model", no_work)
    again = runner.run_experiment(spec, folder / "results.db", folder / "cache", progress=False)
    assert again == rows


def test_a_changed_defense_reruns_only_its_cells_on_the_cached_models(finished, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    _, folder, rows = finished
    results = tmp_path / "results.db"
    results.write_bytes((folder / "results.db").read_bytes())
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("retrained"))
    changed = load_spec(
        write_spec(
            tmp_path, SPEC.replace("epochs: 1}\n  - name: fine", "epochs: 2}\n  - name: fine")
        )
    )
    new = runner.run_experiment(changed, results, folder / "cache", progress=False)
    old_keys = {r["key"] for r in rows}
    assert sum(r["key"] not in old_keys for r in new) == 4  # the four ft cells
    assert all(r["defense_params"]["epochs"] == 2 for r in new if r["label"] == "ft")
    assert read(results, "SELECT COUNT(*) FROM cells") == [(12,)]


def test_a_new_store_on_an_old_cache_adopts_its_models_without_retraining(
    finished, tmp_path, monkeypatch
):
    """A fresh results file sharing the cache (a store moved aside, as after a protocol change):
    the cached models are adopted — rows rebuilt from their cards — and only cells run."""
    spec, folder, rows = finished
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("retrained"))
    said = []
    monkeypatch.setattr(runner.Reporter, "say", lambda self, text: said.append(text))
    new = runner.run_experiment(spec, tmp_path / "new.db", folder / "cache", progress=True)
    assert {r["key"] for r in new} == {r["key"] for r in rows}
    assert sum(line.startswith("adopted from the cache") for line in said) == 4
    columns = "key, acc, asr, path, train_seconds"
    old = read(folder / "results.db", f"SELECT {columns} FROM models ORDER BY key")
    assert read(tmp_path / "new.db", f"SELECT {columns} FROM models ORDER BY key") == old
    identified = read(tmp_path / "new.db", "SELECT identification FROM models WHERE asr >= 0")
    assert identified and all(json.loads(i) for (i,) in identified)  # diagnostics redone


def test_diagnostics_missing_from_a_cached_model_are_added_without_retraining(
    finished, tmp_path, monkeypatch
):
    spec, folder, _ = finished
    results = tmp_path / "results.db"
    results.write_bytes((folder / "results.db").read_bytes())
    with sqlite3.connect(results) as connection:  # as if trained by a spec without diagnostics
        connection.execute("UPDATE models SET identification = NULL, neuron_table = NULL")
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("retrained"))
    runner.run_experiment(spec, results, folder / "cache", progress=False)
    filled = read(results, "SELECT attack, identification IS NOT NULL, neuron_table IS NOT NULL "
                           "FROM models")  # fmt: skip
    assert sorted(filled) == [("badnets", 1, 1), ("badnets", 1, 1), ("none", 0, 0), ("none", 0, 0)]


KILLABLE = """
import sys, time
import torch
from torchpurify import runner
from torchpurify.spec import load_spec

torch.set_num_threads(1)
purify = runner.purify_model


def slow_purify(*args, **kwargs):
    time.sleep(0.5)  # widen every cell so that the kill lands inside one
    return purify(*args, **kwargs)


runner.purify_model = slow_purify
runner.run_experiment(load_spec(sys.argv[1]), sys.argv[2], sys.argv[3], progress=False)
"""


def test_a_killed_run_resumes_without_losing_or_repeating_a_cell(finished, tmp_path):
    spec, _, rows = finished
    spec_path = write_spec(tmp_path)
    results, cache = tmp_path / "results.db", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(spec_path), str(results), str(cache)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    stored = 0
    while stored == 0 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if results.exists():
            try:
                stored = read(results, "SELECT COUNT(*) FROM cells")[0][0]
            except sqlite3.OperationalError:  # the tables are not there yet
                stored = 0
    alive = process.poll() is None
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    assert alive, f"the run ended before it could be killed: {stderr.decode()[-2000:]}"
    before = read(results, "SELECT key FROM cells")
    assert 1 <= len(before) < 8
    models_before = dict(read(results, "SELECT key, created_at FROM models"))

    resumed = runner.run_experiment(load_spec(spec_path), results, cache, progress=False)

    assert read(results, "SELECT COUNT(*), COUNT(DISTINCT key) FROM cells") == [(8, 8)]
    assert {r["key"] for r in resumed} == {r["key"] for r in rows}
    assert set(before) <= set(read(results, "SELECT key FROM cells"))
    models_after = dict(read(results, "SELECT key, created_at FROM models"))
    assert {k: models_after[k] for k in models_before} == models_before  # not retrained
    # Same numbers as the uninterrupted run: every choice is seeded.
    by_key = {r["key"]: r for r in rows}
    for row in resumed:
        assert row["acc_after"] == pytest.approx(by_key[row["key"]]["acc_after"], abs=1e-6)


def test_the_ray_executor_stores_the_same_cells(finished, tmp_path):
    ray = pytest.importorskip("ray")
    spec, _, rows = finished
    smaller = load_spec(write_spec(tmp_path, SPEC.replace("seeds: [0, 1]", "seeds: [1]")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        new = runner.run_experiment(
            smaller, tmp_path / "results.db", tmp_path / "cache", executor="ray", progress=False
        )
    finally:
        ray.shutdown()
    assert read(tmp_path / "results.db", "SELECT COUNT(*), COUNT(DISTINCT key) FROM cells") == [
        (4, 4)
    ]
    assert read(tmp_path / "results.db", "SELECT COUNT(*) FROM models") == [(2,)]
    # The same weights, bit for bit, as the local executor trained: one SHA-256 per model.
    local = dict(read(finished[1] / "results.db", "SELECT key, weights_sha256 FROM models"))
    for key, digest in read(tmp_path / "results.db", "SELECT key, weights_sha256 FROM models"):
        assert digest == local[key]
    by_key = {r["key"]: r for r in rows}
    for row in new:  # the same cells as the local run, with the same numbers
        assert row["acc_after"] == pytest.approx(by_key[row["key"]]["acc_after"], abs=1e-6)
        assert row["asr_after"] == pytest.approx(by_key[row["key"]]["asr_after"], abs=1e-6)


def test_the_ray_executor_without_ray_says_how_to_install_it(finished, tmp_path, monkeypatch):
    spec, folder, _ = finished
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    with pytest.raises(UserError, match=r"pip install 'torchpurify\[ray\]'"):
        runner.run_experiment(
            spec, tmp_path / "results.db", folder / "cache", executor="ray", progress=False
        )


def test_an_attack_that_does_not_fit_the_data_is_reported_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("trained"))
    spec = load_spec(write_spec(tmp_path, SPEC.replace("{size: 2}", "{size: 9}")))
    with pytest.raises(UserError, match=r"attacks\[1\]\.params: badnets: size must be an integer "
                                         r"in \[1, 8\], got 9 .*\(on digits\)"):  # fmt: skip
        runner.run_experiment(spec, tmp_path / "r.db", tmp_path / "cache", progress=False)


cli = CliRunner()

ONE_CELL = """
datasets: [digits]
models: [lenet5]
attacks: [{name: badnets, params: {size: 2}}]
defenses: [{name: fine-pruning, params: {prune_only: true}}]
training: {epochs: 1, batch_size: 64}
defender_fraction: 0.2
"""


def test_cli_run_prints_the_summary_and_resumes(tmp_path):
    spec = write_spec(tmp_path, ONE_CELL)
    args = ["run", str(spec), "--results", str(tmp_path / "r.db"), "--cache",
            str(tmp_path / "cache")]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 cells, 0 already done; 1 models to train" in result.output
    assert "lenet5/badnets/seed 0 fine-pruning: ACC" in result.output
    assert "mean ± std over seeds" in result.output and f"results: {tmp_path / 'r.db'}" in (
        result.output
    )
    again = cli.invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "fine-pruning" in again.output and "already done" not in again.output
    assert read(tmp_path / "r.db", "SELECT COUNT(*) FROM cells") == [(1,)]


PRUNING_AWARE = """
datasets: [digits]
models: [small-cnn]
attacks: [{name: pruning-aware, params: {base: badnets}}]
defenses: [{name: fine-pruning, params: {prune_only: true}}]
training: {epochs: 1, batch_size: 64}
defender_fraction: 0.2
"""


def test_a_grid_trains_the_pruning_aware_attacker_with_its_decoys(tmp_path):
    """An attack with a parameter whose default is a dict (``base_params``, left out here) is a
    grid attack like any other: the runner trains it through its own procedure and the card
    records the decoys."""
    spec = load_spec(write_spec(tmp_path, PRUNING_AWARE))
    (cell,) = cell_jobs(spec)
    assert cell.model.attack.params["base_params"] == {}
    rows = runner.run_experiment(spec, tmp_path / "r.db", tmp_path / "cache", progress=False)
    assert len(rows) == 1 and rows[0]["asr_before"] is not None
    (card_path,) = (tmp_path / "cache").glob("*/model.json")
    card = json.loads(card_path.read_text())
    assert card["attack"]["procedure"]["num_decoys"] > 0, card["attack"]["procedure"]


def test_cli_run_with_a_bad_spec_is_one_line_and_exit_2(tmp_path):
    spec = write_spec(tmp_path, ONE_CELL.replace("prune_only", "prune_onyl"))
    result = cli.invoke(app, ["run", str(spec), "--results", str(tmp_path / "r.db")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {spec}: defenses[0].params: unknown parameter 'prune_onyl' for fine-pruning "
        "(did you mean prune_only?)"
    ]
    assert not (tmp_path / "r.db").exists()


def test_a_grid_that_does_not_fit_or_bad_seeds_leave_no_results_file(tmp_path):
    spec = load_spec(write_spec(tmp_path, ONE_CELL.replace("params: {size: 2}}", "target: 12}")))
    with pytest.raises(UserError, match=r"attacks\[0\]\.target: digits has labels 0\.\.9"):
        runner.run_experiment(spec, tmp_path / "r.db", tmp_path / "cache", progress=False)
    assert not (tmp_path / "r.db").exists()
    bad_seeds = write_spec(tmp_path, ONE_CELL + "seeds: [-1]\n", name="seeds.yaml")
    result = cli.invoke(app, ["run", str(bad_seeds), "--results", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "seeds[0]: must be an integer in 0..4294967295" in (
        result.output
    )
    assert not (tmp_path / "r.db").exists()


TWO_CELLS = ONE_CELL.replace(
    "defenses: [{name: fine-pruning, params: {prune_only: true}}]",
    "defenses: [{name: fine-pruning, params: {prune_only: true}}, {name: ft, params: {epochs: 1}}]",
)


@pytest.fixture
def short_leases(monkeypatch):
    """Leases that go stale after 2 s, so waiting for another runner takes a test's time."""
    monkeypatch.setattr(store_module, "LEASE_SECONDS", 2.0)


def test_a_cell_another_live_runner_holds_is_left_to_it(tmp_path, short_leases):
    """A fake second runner claims the ft cell and keeps its lease alive; this runner runs the
    other cell, waits, and takes the fake's row as it is (it never recomputes the cell)."""
    spec = load_spec(write_spec(tmp_path, TWO_CELLS))
    pruning, ft = cell_jobs(spec)
    results = tmp_path / "r.db"
    with Store(results) as store:
        assert store.claim(ft.key, "other")
    stop = threading.Event()

    def other_runner():
        with Store(results) as store:
            while not stop.wait(0.2):
                store.claim(ft.key, "other")  # the heartbeat
                if store.has_cell(pruning.key):  # "finishes" its cell once ours is done
                    row = {**store.cells([pruning.key])[0], "key": ft.key, "label": "ft",
                           "defense": "ft", "acc_after": 0.123}  # fmt: skip
                    store.add_cell(row)
                    return

    thread = threading.Thread(target=other_runner)
    thread.start()
    log = io.StringIO()
    try:
        rows = runner.run_experiment(spec, results, tmp_path / "cache",
                                     console=Console(file=log, width=200))  # fmt: skip
    finally:
        stop.set()
        thread.join()
    assert {r["key"]: r["acc_after"] for r in rows}[ft.key] == 0.123
    assert read(results, "SELECT COUNT(*), COUNT(DISTINCT key) FROM cells") == [(2, 2)]
    assert "claimed by another runner; waiting" in log.getvalue()
    assert "this runner ran 1 cells" in log.getvalue()
    assert read(results, "SELECT COUNT(*) FROM leases") == [(0,)]


def test_a_dead_runners_claims_are_taken_over_and_its_staging_swept(tmp_path, short_leases):
    spec = load_spec(write_spec(tmp_path, TWO_CELLS))
    cells = cell_jobs(spec)
    results, cache = tmp_path / "r.db", tmp_path / "cache"
    model_key = cells[0].model.key
    staging = cache / f".{model_key}.k1ll3d00"  # a save killed half-way
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"half")
    with Store(results) as store:  # a runner that died: its leases are never refreshed again
        for key in (f"model:{model_key}", cells[0].key, cells[1].key):
            assert store.claim(key, "dead")
    started = time.monotonic()
    rows = runner.run_experiment(spec, results, cache, progress=False)
    assert time.monotonic() - started >= 2.0  # it waited until the leases went stale
    assert len(rows) == 2 and read(results, "SELECT COUNT(*) FROM models") == [(1,)]
    assert not staging.exists() and (cache / model_key / "model.json").is_file()


def test_a_retrained_model_that_differs_from_the_stored_one_is_reported(tmp_path):
    """A model whose row is stored but whose cached folder is gone is retrained; when the new
    one differs (training is not bit-reproducible across machines), the runner says so."""
    spec = load_spec(write_spec(tmp_path))
    job = runner.model_jobs(spec)[0]
    out = io.StringIO()
    report = runner.Reporter(Console(file=out, width=400), total=1, done=0)
    old = {"acc": 0.90, "asr": 1.0, "train_seconds": 1.0}
    stage = runner.ModelStage(job, tmp_path, "train", old)
    report.model(stage, {**old, "train_seconds": 2.0})
    assert "warning" not in out.getvalue()
    report.model(stage, {**old, "acc": 0.91})
    assert "warning" in out.getvalue() and "0.9000 → 0.9100" in out.getvalue()
    report.model(runner.ModelStage(job, tmp_path, "train", None), {**old, "acc": 0.5})
    assert out.getvalue().count("warning") == 1


def test_auto_cells_are_stored_and_reported_with_their_choice(finished, tmp_path, monkeypatch):
    """`auto` as a grid defense (issue 28 item 4): its cells run on the cached models, store the
    estimate it made and the defense it chose, and the report shows it as a row."""
    from torchpurify.report import write_report

    _, folder, _ = finished
    results = tmp_path / "results.db"
    results.write_bytes((folder / "results.db").read_bytes())
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("retrained"))
    text = SPEC.split("defenses:")[0] + textwrap.dedent("""\
        defenses:
          - name: auto
            params: {order: ft, settings: {ft: {epochs: 1}}}
        seeds: [0, 1]
        training: {epochs: 1, batch_size: 64}
        defender_fraction: 0.2
        diagnostics: true
        device: cpu
        estimate: {families: [mask], steps: 20, capped_steps: 10}
        """)  # fmt: skip
    new = runner.run_experiment(load_spec(write_spec(tmp_path, text)), results, folder / "cache")
    assert len(new) == 4 and {r["defense"] for r in new} == {"auto"}
    for row in new:
        record = row["log"]["auto"]
        assert row["estimate"]["chosen"] == record["chosen"]
        assert record["chosen"] in (None, "ft") and record["stopped"]
        assert row["est_asr_after"] == row["estimate"]["after"]["est_asr"]
    markdown = write_report(results, tmp_path / "report")[0].read_text()
    assert "\n| auto | 2 |" in markdown  # a row of the backdoored and the clean model's tables
    assert "- auto, seed 0: chose " in markdown


def test_ray_tasks_that_run_long_leave_a_timestamped_line_in_the_log(tmp_path, monkeypatch):
    """Ray tasks print nothing in the driver: while none finishes, ``collect`` says at most once
    per HEARTBEAT_SECONDS what is still running, so a log redirected to a file shows life."""
    spec = load_spec(write_spec(tmp_path))
    job = runner.model_jobs(spec)[0]
    cell = runner.cell_jobs(spec, [job])[0]
    stage = runner.ModelStage(job, tmp_path, "train", None)
    model_row = {"key": job.key, "acc": 0.9, "asr": 1.0, "train_seconds": 1.0}

    class FakeRay:  # the model finishes after two silent waits, then the cell
        def __init__(self):
            self.waits, self.timeouts = 0, []

        def wait(self, pending, num_returns, timeout):
            self.timeouts.append(timeout)
            self.waits += 1
            if self.waits in (1, 2, 4):
                return [], pending
            return [pending[0]], pending[1:]

        def get(self, ref):
            return model_row if ref == "m" else {"cell": ref}

        exceptions = None

    stored = []
    store = SimpleNamespace(
        add_model=lambda row: stored.append(("model", row)),
        add_cell=lambda row: stored.append(("cell", row)),
        model=lambda key: model_row,
    )
    out = io.StringIO()
    report = runner.Reporter(Console(file=out, width=400), total=1, done=0)
    monkeypatch.setattr(runner.Reporter, "cell", lambda self, row: self.say("cell done"))
    monkeypatch.setattr(runner, "ray_result", lambda ray, ref: ray.get(ref))
    fake = FakeRay()
    runner.collect(fake, {"m": stage, "c": cell}, {job.key: "m"}, store, report)
    lines = out.getvalue().splitlines()
    assert set(fake.timeouts) == {runner.HEARTBEAT_SECONDS}
    alive = [line for line in lines if "still working" in line]
    assert len(alive) == 3
    assert re.match(
        r"\d\d:\d\d:\d\d still working: 1 models to train, 1 cells running or "
        r"queued; 0/1 cells done, \d+ s since the last result$",
        alive[0],
    )
    assert "still working: 1 cells running or queued" in alive[2]
    assert [kind for kind, _ in stored] == ["model", "cell"]
