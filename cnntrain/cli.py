"""The `cnntrain` command: parse, load, call one function, print, exit with a code.

Exit codes: 0 done, 1 runtime error (data, files), 2 bad usage or config, 3 diverged.
Heavy modules (NumPy, pydantic, the engine) are imported inside the commands so that
`cnntrain --help` answers at once.
"""

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Train and evaluate LeNet-class CNNs written in pure NumPy on MNIST-family data.")


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
        dataset = load_dataset(d["dataset"], d["dir"], fallback=d["fallback"])
    except (DataNotFound, IDXError) as e:
        fail(str(e), 1)
    if dataset.warning and not quiet:
        typer.echo(f"warning: {dataset.warning}", err=True)
    return dataset


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config file, e.g. configs/lenet.yaml."),
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]...",
        help="Dotted overrides with YAML values: optimizer.lr=1e-3 training.epochs=3 "
             "model.layers.ff5.units=200."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders go."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the config's name)."),
    init: Optional[Path] = typer.Option(None, "--init", metavar="CKPT",
                                        help="Start from this checkpoint's weights (fresh optimiser)."),
    json_mode: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Train the network CONFIG describes; write runs/NAME/ (config.yaml, metrics.csv, summary.json, checkpoints/last.npz)."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import ConfigError, dump_yaml, load_config
    from .report import Progress
    from .runs import claim_run_dir
    from .train import DataMismatch, ShapeError, make_model, prepare_data
    from .train import train as run_training

    # Everything that can be wrong with the inputs is checked before a run folder exists.
    try:
        cfg_obj = load_config(config, list(overrides or []) + ([f"name={name}"] if name else []))
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
        fail(f"{config}: {e}", 2)

    run_dir = claim_run_dir(runs_dir, cfg["name"])
    progress = Progress(quiet=quiet)
    progress.line(f"run folder {run_dir}  ({len(splits['train'][0])} train, "
                  f"{len(splits['val'][0])} val, {len(splits['test'][0])} test images of "
                  f"{dataset.name})")
    try:
        summary = run_training(cfg, model, splits, run_dir, dataset.info(), progress,
                               config_yaml=dump_yaml(cfg_obj))
    except FloatingPointError as e:
        fail(f"diverged: {e}", 3)
    if json_mode:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"test accuracy {100 * summary['test_acc']:.2f}%  test loss "
                   f"{summary['test_loss']:.4f}  {summary['train_images_per_s']:.0f} images/s  "
                   f"-> {run_dir}")


@app.command("eval")
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint .npz written by `cnntrain train`."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Evaluate on this dataset instead."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Evaluate on the IDX files in this folder."),
    json_mode: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
):
    """Test accuracy and loss of a checkpoint; the checkpoint carries its config."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import Config, ConfigError
    from .train import DataMismatch, ShapeError, evaluate, make_model, prepare_data

    try:
        ckpt = load_checkpoint(checkpoint)
        cfg = Config.from_dict(ckpt.metadata["config"], source=f"{checkpoint} (stored config)").to_dict()
        model = make_model(cfg)
        model.load_params(ckpt.params)
    except (CheckpointError, ConfigError, ShapeError) as e:
        fail(str(e), 1)
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
    loss, acc = evaluate(model, test_x, test_y, cfg["training"]["eval_batch_size"])
    result = {"checkpoint": str(checkpoint), "epoch": ckpt.metadata.get("epoch"),
              "test_acc": acc, "test_loss": loss, "test_images": len(test_x),
              "data": data.info()}
    if json_mode:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"test accuracy {100 * acc:.2f}%  test loss {loss:.4f}  on {len(test_x)} "
                   f"images of {data.name}  ({checkpoint}, epoch {result['epoch']})")


def main():  # pragma: no cover - the console script calls app() directly
    app()


if __name__ == "__main__":
    sys.exit(main())
