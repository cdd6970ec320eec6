"""The `cnntrain` command: parse, load, call one function, print, exit with a code.

Exit codes: 0 done, 1 runtime error (data, files), 2 bad usage or config, 3 diverged,
130 and 143 stopped by SIGINT and SIGTERM (resumable with `train --resume`).
Heavy modules (NumPy, pydantic, the engine) are imported inside the commands so that
`cnntrain --help` answers at once.
"""

import json
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import typer

from .cli_data import data_app

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Train and evaluate LeNet-class CNNs written in pure NumPy on MNIST-family data.")
app.add_typer(data_app, name="data")


def fail(message, code):
    """One line on stderr, no traceback, and the exit code."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def human(text, json_mode):
    # With --json, stdout carries only the JSON object; everything for people goes to stderr.
    typer.echo(text, err=json_mode)


def load_data(cfg, json_mode, quiet):
    from .data.datasets import DataNotFound, load_dataset
    from .data.idx import IDXError

    d = cfg["data"]
    try:
        dataset = load_dataset(d["dataset"], d["dir"], fallback=d["fallback"], mirrors=d["mirrors"],
                               quiet=quiet)
    except (DataNotFound, IDXError) as e:
        fail(str(e), 1)
    if dataset.warning and not quiet:
        typer.echo(f"warning: {dataset.warning}", err=True)
    return dataset


def load_model(checkpoint):
    """(checkpoint, its config as a dict, the model with its weights), or exit 1 with one line."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import Config, ConfigError
    from .train import ShapeError, make_model

    try:
        ckpt = load_checkpoint(checkpoint)
        cfg = Config.from_dict(ckpt.metadata["config"], source=f"{checkpoint} (stored config)").to_dict()
        model = make_model(cfg)
        model.load_params(ckpt.params)
    except (CheckpointError, ConfigError, ShapeError) as e:
        fail(str(e), 1)
    return ckpt, cfg, model


@app.command()
def train(
    config: Optional[str] = typer.Argument(
        None, metavar="CONFIG", help="YAML config file, e.g. configs/lenet.yaml (none with --resume)."),
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]...",
        help="Dotted overrides with YAML values: optimizer.lr=1e-3 training.epochs=3 "
             "model.layers.ff5.units=200."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders go."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the config's name)."),
    init: Optional[Path] = typer.Option(None, "--init", metavar="CKPT",
                                        help="Start from this checkpoint's weights (fresh optimiser)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", metavar="RUN_DIR",
        help="Continue the run in RUN_DIR where it stopped; KEY=VALUE may raise training.epochs."),
    exist_ok: bool = typer.Option(False, "--exist-ok",
                                  help="Use runs/NAME even if it exists, replacing the run in it."),
    no_plots: bool = typer.Option(False, "--no-plots",
                                  help="Skip results.png and confusion_matrix.png (about 1 s a run)."),
    json_mode: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Train the network CONFIG describes; write runs/NAME/ (config.yaml, overrides.txt, metrics.csv, summary.json, checkpoints/, plots)."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import ConfigError, dump_yaml, load_config
    from .interrupt import stop_on_signals
    from .report import Progress
    from .resume import ResumeError, check_fits, prepare_resume
    from .runs import claim_run_dir, clear_run_files, remove_temporaries, run_lock
    from .engine.errors import WorkerError
    from .train import DataMismatch, Interrupted, ShapeError, make_model, prepare_data
    from .train import train as run_training

    # Everything that can be wrong with the inputs is checked before a run folder is made
    # or, for --resume, touched.
    overrides = list(overrides or [])
    resumed = None
    if resume is not None:
        if config is not None:
            if "=" not in config:
                fail(f"--resume takes the config from {resume}/config.yaml: give only KEY=VALUE "
                     f"overrides, not {config}", 2)
            overrides.insert(0, config)  # the first override landed in CONFIG's place
        if name or init or exist_ok:
            fail("--resume continues a run in its own folder: no --name, --init or --exist-ok", 2)
        try:
            resumed = prepare_resume(resume, overrides)
        except ResumeError as e:
            fail(str(e), e.exit_code)
        except ConfigError as e:
            fail(str(e), 2)
        except CheckpointError as e:
            fail(str(e), 1)
        cfg_obj, cfg, model = resumed.cfg_obj, resumed.cfg, resumed.model
    else:
        if config is None:
            fail("missing CONFIG: give a config file, or --resume RUN_DIR", 2)
        try:
            cfg_obj = load_config(config, overrides + ([f"name={name}"] if name else []))
        except ConfigError as e:
            fail(str(e), 2)
        cfg = cfg_obj.to_dict()
        try:
            model = make_model(cfg)
        except ShapeError as e:
            fail(f"{config}: model.layers: {e}", 2)
        if init is not None:
            try:
                model.load_params(load_checkpoint(init).params)
            except CheckpointError as e:
                fail(str(e), 1)
            except ShapeError as e:
                fail(f"--init {init}: does not fit the configured model: {e}", 2)
    dataset = load_data(cfg, json_mode, quiet)
    try:
        splits = prepare_data(cfg, dataset, model)
    except (DataMismatch, ValueError) as e:
        fail(f"{config or resume / 'config.yaml'}: {e}", 2)
    if resumed is not None:
        try:
            check_fits(resumed, resume, resumed.summary.get("data", {}), dataset.info(),
                       len(splits["train"][0]))
        except ResumeError as e:
            fail(str(e), e.exit_code)

    with stop_on_signals() as stop:
        run_dir = resume if resumed else claim_run_dir(runs_dir, cfg["name"], exist_ok=exist_ok)
        from filelock import Timeout

        lock = run_lock(run_dir)
        try:
            lock.acquire()
        except Timeout:
            fail(f"{run_dir}: another cnntrain process is training in this folder", 1)
        with lock:
            remove_temporaries(run_dir)
            if exist_ok:
                clear_run_files(run_dir)
            progress = Progress(quiet=quiet)
            counts = (f"({len(splits['train'][0])} train, {len(splits['val'][0])} val, "
                      f"{len(splits['test'][0])} test images of {dataset.name})")
            if resumed:
                state = resumed.state
                where = f"after epoch {state.epoch}" + (f", batch {state.batch}" if state.batch else "")
                progress.line(f"resuming {run_dir} {where}  {counts}")
                kwargs = dict(state=state, velocity=resumed.velocity, summary=resumed.summary,
                              restore_rows=resumed.restore_rows)
            else:
                progress.line(f"run folder {run_dir}  {counts}")
                kwargs = dict(summary={"overrides": overrides,
                                       "init": str(init) if init is not None else None})
            try:
                summary = run_training(cfg, model, splits, run_dir, dataset.info(), progress,
                                       config_yaml=dump_yaml(cfg_obj), stop=stop,
                                       plots=not no_plots, **kwargs)
            except FloatingPointError as e:
                progress.close()
                fail(f"diverged: {e}", 3)
            except Interrupted as e:
                progress.close()
                fail(str(e), e.exit_code)
            except KeyboardInterrupt:
                progress.close()
                fail(f"interrupted by a second SIGINT; continue with: cnntrain train --resume {run_dir}", 130)
            except (OSError, CheckpointError) as e:
                progress.close()
                fail(str(e), 1)
            except WorkerError as e:
                progress.close()
                fail(f"{e}; continue with: cnntrain train --resume {run_dir}", 1)
    if json_mode:
        typer.echo(json.dumps(summary))
    else:
        best = (f"  best epoch {summary['best_epoch']} (val acc {100 * summary['best_val_acc']:.2f}%)"
                if summary["best_epoch"] is not None else "")
        images_per_s = summary["train_images_per_s"]
        typer.echo(f"test accuracy {100 * summary['test_acc']:.2f}%  test loss "
                   f"{summary['test_loss']:.4f}{best}  "
                   f"{images_per_s:.0f} images/s  -> {run_dir}" if images_per_s else
                   f"test accuracy {100 * summary['test_acc']:.2f}%  test loss "
                   f"{summary['test_loss']:.4f}{best}  -> {run_dir}")


@app.command("eval")
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint .npz written by `cnntrain train`."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Evaluate on this dataset instead."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Evaluate on the IDX files in this folder."),
    json_mode: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
):
    """Test accuracy and loss of a checkpoint, per-class accuracy and the confusion matrix; the checkpoint carries its config."""
    from .report import class_names, confusion_table, print_table
    from .train import DataMismatch, evaluate_with_confusion, prepare_data

    ckpt, cfg, model = load_model(checkpoint)
    if dataset is not None:
        cfg["data"]["dataset"], cfg["data"]["dir"] = dataset, None
    if data_dir is not None:
        cfg["data"]["dir"] = str(data_dir)
    data = load_data(cfg, json_mode, quiet=False)
    cfg["data"]["validation"] = 0  # evaluation uses the test split only
    try:
        splits = prepare_data(cfg, data, model)
    except (DataMismatch, ValueError) as e:
        fail(str(e), 2)
    test_x, test_y = splits["test"]
    loss, acc, matrix = evaluate_with_confusion(model, test_x, test_y, cfg["training"]["eval_batch_size"])
    per_class = [int(matrix[k, k]) / int(row.sum()) if row.sum() else None for k, row in enumerate(matrix)]
    result = {"checkpoint": str(checkpoint), "epoch": ckpt.metadata.get("epoch"),
              "test_acc": acc, "test_loss": loss, "test_images": len(test_x),
              "data": data.info(), "classes": class_names(data.name, len(matrix)),
              "per_class_acc": per_class, "confusion_matrix": matrix.tolist()}
    if json_mode:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"test accuracy {100 * acc:.2f}%  test loss {loss:.4f}  on {len(test_x)} "
                   f"images of {data.name}  ({checkpoint}, epoch {result['epoch']})")
        print_table(confusion_table(matrix, result["classes"], per_class))


@app.command()
def bench(
    config: Path = typer.Argument(Path("configs/lenet.yaml"), help="The network to time."),
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="Config overrides, as for train."),
    batch_sizes: str = typer.Option("1,64,256", "--batch-sizes", help="Training batch sizes, comma-separated."),
    images: int = typer.Option(4096, "--images", min=1, help="Images per timed pass."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed passes; the median is reported."),
    real_data: bool = typer.Option(False, "--real-data", help="Time on the config's dataset instead of random pixels."),
    json_mode: bool = typer.Option(False, "--json", help="Print the figures as one JSON object on stdout."),
):
    """Time the training and evaluation loops (images/s, median of several passes) and, when torch is importable, the same network in PyTorch. Never fails on speed."""
    from .bench import run_bench
    from .config import ConfigError, load_config
    from .train import ShapeError, make_model, worker_threads

    try:
        sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        fail(f"--batch-sizes: expected positive integers separated by commas, got {batch_sizes!r}", 2)
    try:
        cfg = load_config(config, list(overrides or [])).to_dict()
        make_model(cfg)  # shape errors now, not halfway through the timings
    except ConfigError as e:
        fail(str(e), 2)
    except ShapeError as e:
        fail(f"{config}: model.layers: {e}", 2)
    data = load_data(cfg, json_mode, quiet=json_mode) if real_data else None
    human(f"timing {config} on {images} images, median of {repeats} passes ...", True)
    workers = worker_threads(cfg["training"]["threads"])
    result = run_bench(cfg, sizes, images, repeats, data=data, workers=workers)
    if json_mode:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    torch = result.get("torch")
    table = Table(title=f"cnntrain bench: {result['images']} {result['data']} images, "
                        f"{result['dtype']}, {workers} worker(s), median of "
                        f"{result['repeats']} passes")
    table.add_column("job")
    table.add_column("cnntrain images/s", justify="right")
    if torch:
        table.add_column(f"torch {torch['version']} ({torch['threads']} threads)", justify="right")
        table.add_column("ratio", justify="right")
    jobs = [(f"train_{bs}", f"train, batch {bs}") for bs in sizes]
    jobs.append(("eval", f"evaluate, batch {result['eval_batch_size']}"))
    for key, label in jobs:
        cells = [label, f"{result['cnntrain'][key]:,.0f}"]
        if torch:
            cells += [f"{torch[key]:,.0f}", f"{result['ratio'][key]:.2f}x"]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    memory = f"peak memory before torch was imported: {result['peak_rss_mib']:.0f} MiB"
    if result["helper_peak_rss_mib"] is not None:
        memory += (f" in this process, plus {result['helper_peak_rss_mib']:.0f} MiB in each of "
                   f"a run's {result['helpers']} helper process(es)")
    console.print(memory)
    if not torch:
        console.print("torch is not importable here (or the network has a connection table): "
                      "no PyTorch comparison")


# --sort keys where higher is better: listed best first
_HIGHER_IS_BETTER = ("best_val_acc", "test_acc", "images_per_s")


@app.command("runs")
def runs_cmd(
    folder: Path = typer.Argument(Path("runs"), help="A folder of run folders, e.g. runs or runs/sweep."),
    sort: Optional[str] = typer.Option(
        None, "--sort", metavar="KEY",
        help="run, status, epochs, best_val_acc, test_acc, test_loss, images_per_s, or a config "
             "key such as optimizer.lr. Accuracies and images/s sort best first."),
    reverse: bool = typer.Option(False, "--reverse", help="Reverse the order."),
    json_mode: bool = typer.Option(False, "--json", help="Print the runs as one JSON list on stdout."),
):
    """A table of every run in FOLDER: status, the config keys that differ between the runs, epochs, best validation accuracy, test accuracy, images/s."""
    from .report import print_table, runs_table
    from .runs import collect_runs

    if not folder.is_dir():
        fail(f"{folder}: no such folder", 1)
    records, differing = collect_runs(folder)
    if sort is not None:
        keys = ["run", "status", "epochs", "best_val_acc", "test_acc", "test_loss", "images_per_s", *differing]
        if sort not in keys:
            fail(f"--sort {sort}: expected one of {', '.join(keys)}", 2)

        def value(r):
            return r["differs"][sort] if sort in differing else r[sort]

        present = [r for r in records if value(r) is not None]
        present.sort(key=lambda r: (json.dumps(value(r)) if isinstance(value(r), (list, dict)) else value(r)),
                     reverse=sort in _HIGHER_IS_BETTER)
        records = present + [r for r in records if value(r) is None]  # missing values last
    if reverse:
        records.reverse()
    if json_mode:
        typer.echo(json.dumps(records))
    elif not records:
        typer.echo(f"no runs in {folder}", err=True)
    else:
        print_table(runs_table(records, differing, str(folder)))


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="A checkpoint .npz written by `cnntrain train`."),
    files: List[Path] = typer.Argument(..., help="PNG/JPEG images (any size) or IDX image files."),
    top: int = typer.Option(3, "--top", min=1, help="How many of the likeliest classes to show."),
    invert: str = typer.Option(
        "auto", "--invert",
        help="auto: invert images with a light background (MNIST is white on black); yes; no."),
    json_mode: bool = typer.Option(False, "--json", help="Print the predictions as one JSON object on stdout."),
):
    """The class of each image and the top probabilities. Images become the model's input: grayscale, white on black, padded and resized."""
    from .predict import InputError, load_inputs, predict as predict_probs
    from .report import class_names

    if invert not in ("auto", "yes", "no"):
        fail(f"--invert: expected auto, yes or no, got {invert!r}", 2)
    ckpt, cfg, model = load_model(checkpoint)
    c, h, w = model.input_shape
    if c != 1:
        fail(f"{checkpoint}: the model takes {c}-channel images; predict reads grayscale only", 2)
    try:
        inputs = [item for path in files for item in load_inputs(path, h, w, invert)]
    except InputError as e:
        fail(str(e), 1)
    import numpy as np

    probs = predict_probs(model, np.stack([a for _, a in inputs]), cfg["training"]["eval_batch_size"])
    names = class_names(cfg["data"]["dataset"], probs.shape[1])
    predictions = []
    for (label, _), p in zip(inputs, probs):
        order = np.argsort(-p, kind="stable")[:top]
        predictions.append({"input": label, "class": int(order[0]), "name": names[order[0]],
                            "top": [{"class": int(k), "name": names[k], "prob": float(p[k])} for k in order]})
    if json_mode:
        typer.echo(json.dumps({"checkpoint": str(checkpoint), "predictions": predictions}))
        return
    for pred in predictions:
        others = ", ".join(f"{t['name']} {100 * t['prob']:.1f}%" for t in pred["top"])
        typer.echo(f"{pred['input']}: {pred['name']}  ({others})")


@app.command()
def sweep(
    spec_file: Optional[Path] = typer.Argument(
        None, metavar="SPEC", help="Sweep spec (YAML), e.g. sweeps/lr-momentum.yaml (none with --resume)."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Join this Ray cluster (auto or HOST:PORT) instead of starting one here."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1,
                                                 help="At most N trials at a time."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="The sweep folder goes in here."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", metavar="SWEEP_DIR",
        help="Finish the trials of the sweep in SWEEP_DIR that had not finished; keep the others."),
    json_mode: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout."),
):
    """Run a hyperparameter sweep on Ray Tune (the `ray` extra); each trial is a run folder runs/NAME/TRIAL, then a table sorted by the spec's metric and sweep.json."""
    from contextlib import redirect_stdout

    from .report import print_table
    from .sweep import (SweepError, import_ray, load_spec, local_cpus, run_sweep, save_spec,
                        start_ray, summarize, sweep_table)

    # the spec and every search value are checked before Ray is imported or a folder made
    try:
        if resume is not None:
            if spec_file is not None:
                raise SweepError(f"--resume takes the spec from {resume}/sweep.yaml: give no SPEC")
            if not (resume / "sweep.yaml").is_file():
                raise SweepError(f"{resume}: not a sweep folder (no sweep.yaml)")
            spec, base = load_spec(resume / "sweep.yaml")
            sweep_dir = resume
        else:
            if spec_file is None:
                raise SweepError("missing SPEC: give a sweep spec, or --resume SWEEP_DIR")
            spec, base = load_spec(spec_file)
            sweep_dir = runs_dir / spec.name
            if sweep_dir.exists():
                raise SweepError(f"{sweep_dir} exists: continue that sweep with --resume {sweep_dir}, "
                                 f"or give the spec another name")
        ray = import_ray()
    except SweepError as e:
        fail(str(e), e.exit_code)
    if resume is None:
        sweep_dir.mkdir(parents=True)
        save_spec(spec, base, sweep_dir)
    human(f"sweep {spec.name} -> {sweep_dir}" + (f" on the Ray cluster at {address}" if address else ""),
          json_mode)
    with redirect_stdout(sys.stderr) if json_mode else nullcontext():
        start_ray(ray, address, local_cpus())
        try:
            finished = run_sweep(spec, base, sweep_dir, resume=resume is not None,
                                 max_concurrent=max_concurrent)
        finally:
            ray.shutdown()
    result = summarize(spec, sweep_dir)
    if json_mode:
        typer.echo(json.dumps(result))
    else:
        print_table(sweep_table(result, list(spec.search)))
    if not finished:
        fail(f"sweep interrupted; continue with: cnntrain sweep --resume {sweep_dir}", 130)
    if any(t["status"] in ("failed", "killed", "unreadable") for t in result["trials"]):
        fail(f"some trials failed; their folders in {sweep_dir} say why", 1)


def main():
    """The console script: the app, with Ctrl-C outside training answered as documented.

    Click would print "Aborted!" and exit 1. Training installs its own handler (it stops
    after the current step and saves); everywhere else a Ctrl-C ends the command with one
    line and exit 130, unwinding normally so that cleanups run (a download's partial file
    is removed).
    """
    def interrupted(signum, frame):
        typer.echo("error: interrupted by SIGINT", err=True)
        raise SystemExit(130)

    signal.signal(signal.SIGINT, interrupted)
    from .engine.errors import WorkerError

    try:
        app(prog_name="cnntrain")
    except WorkerError as e:  # a helper process died (killed, out of memory): say so, once
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main())
