"""Hyperparameter sweeps on Ray Tune (`cnntrain sweep SPEC`).

A sweep spec (YAML) names a base config, overrides for every trial and a search space of
dotted config keys. The spec is read and every search key is checked as an override of
the base config before Ray is imported, so a bad spec costs nothing. Each trial is an
ordinary run folder, runs/<sweep>/<trial>, trained by the same functions as
`cnntrain train`; Ray only schedules the trials, and sees one result per epoch so that
ASHA can stop weak trials at epoch boundaries.

The sweep folder holds sweep.yaml (the spec, base made absolute), ray-tune/ (Ray's own
experiment state, which `--resume` restores), one folder per trial and, at the end,
sweep.json. Ray is an optional extra: nothing else in cnntrain imports it.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from .config import ConfigError, Float, PosInt, Str, _explain, _parse_yaml, _show, load_config, read_yaml_file

RAY_EXTRA = 'pip install -e ".[ray]"'
RAY_DIR = "ray-tune"                    # Ray Tune's experiment state, inside the sweep folder
STOPPED = "stopped_by_scheduler"        # summary.json status of a trial ASHA stopped
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
_DEFAULT_MODE = {"val_acc": "max", "train_acc": "max", "val_loss": "min", "train_loss": "min"}


class SweepError(Exception):
    """A spec or sweep folder that cannot be used, as one line; exit code 2 or 1."""

    def __init__(self, message, exit_code=2):
        self.exit_code = exit_code
        super().__init__(message)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Value = Union[Annotated[int, Strict()], Float, Annotated[bool, Strict()], Str, None]


class Dimension(_Strict):
    """One search key: exactly one way of drawing its values."""

    grid: Optional[list[Value]] = None        # every value, in every combination
    choice: Optional[list[Value]] = None      # one value drawn per sample
    randint: Optional[tuple[Annotated[int, Strict()], Annotated[int, Strict()]]] = None  # lo..hi, both included
    uniform: Optional[tuple[Float, Float]] = None
    loguniform: Optional[tuple[Float, Float]] = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of {', '.join(type(self).model_fields)}, "
                             f"got {', '.join(given) or 'none'}")
        kind, value = given[0], getattr(self, given[0])
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind}: expected a non-empty list")
        if kind in ("randint", "uniform", "loguniform") and not value[0] < value[1]:
            raise ValueError(f"{kind}: expected [lo, hi] with lo < hi, got {_show(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: expected lo > 0, got {_show(value)}")
        return self

    @property
    def kind(self):
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def values(self):
        return getattr(self, self.kind)


class Asha(_Strict):
    type: Literal["asha"]
    grace_period: PosInt = 1             # epochs every trial gets before it can be stopped
    reduction_factor: Annotated[Float, Field(gt=1)] = 4


class Resources(_Strict):
    cpus_per_trial: PosInt = 1


class Spec(_Strict):
    """A whole sweep spec."""

    base: Str
    name: Optional[Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9_.-]+$")]] = None
    overrides: dict[str, Value] = {}
    search: dict[str, Dimension]
    samples: PosInt = 1
    # Seeds the random draws (choice, randint, uniform, loguniform), so the same spec
    # draws the same trials; each trial's own seed is the config's `seed`.
    seed: Annotated[int, Strict(), Field(ge=0)] = 0
    metric: Literal[METRICS] = "val_acc"
    mode: Optional[Literal["max", "min"]] = None
    scheduler: Union[Literal["fifo", "asha"], Asha] = "fifo"
    resources: Resources = Resources()
    plots: Annotated[bool, Strict()] = True   # results.png and confusion_matrix.png per trial

    @model_validator(mode="after")
    def _not_empty(self):
        if not self.search:
            raise ValueError("search: expected at least one key to search over, got none")
        return self


def _first_error(errors):
    """The error to show: an unknown key before a missing one (a misspelt key is both), and
    for `scheduler`, the branch the value was meant for."""
    def branch_fits(e):
        tags = [p for p in e["loc"] if isinstance(p, str) and p.startswith("literal[")]
        return not (tags and isinstance(e.get("input"), dict))
    errors = [e for e in errors if branch_fits(e)] or errors
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def _spec_error(err, source):
    # pydantic puts union branches (Asha, literal[...]) and validators in the location
    loc = ".".join(str(p) for p in err["loc"]
                   if not (str(p) in ("Asha",) or str(p).startswith(("literal[", "function-"))))
    if err["type"] == "extra_forbidden":
        *parent, key = err["loc"]
        model = Spec
        for part in parent:  # find the section the unknown key sits in
            model = {"search": Dimension, "resources": Resources}.get(str(part), model)
            if model is Spec and part == "scheduler":
                model = Asha
        if parent and parent[0] == "search":
            model = Dimension
        valid = list(model.model_fields)
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(valid)}"
        return f"{source}: {loc}: unknown key; {hint}"
    if err["type"] == "value_error":
        return f"{source}: {loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}"
    return f"{source}: {loc}: {_explain(err)}"


def _override(key, value):
    # JSON is YAML, so the value reads back as the same type (1e-06 stays a float); a
    # string goes unquoted when YAML reads it back unchanged (mnist-sample, not "10")
    text = json.dumps(value)
    if isinstance(value, str) and _parse_yaml(value, key, value=True) == value:
        text = value
    return f"{key}={text}"


def load_spec(path):
    """Read and validate a spec and check every search value against the base config;
    returns (spec, absolute base path). Raises SweepError (exit 2) without touching Ray."""
    path = Path(path)
    try:
        data = read_yaml_file(path, "sweep spec")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a YAML mapping at the top level")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise SweepError(_spec_error(_first_error(e.errors()), path)) from None
    base = Path(spec.base)
    base = (base if base.is_absolute() else path.parent / base).resolve()  # relative to the spec
    if spec.name is None:
        spec = spec.model_copy(update={"name": path.stem})
    first = {key: dim.values[0] for key, dim in spec.search.items()}
    try:
        for key, dim in spec.search.items():
            for value in dim.values:  # all of a list, both ends of a range
                cfg = load_config(base, trial_overrides(spec, {**first, key: value}))
                _check_model(cfg.to_dict())
    except ConfigError as e:
        raise SweepError(f"{path}: {e}") from None
    cfg = load_config(base, trial_overrides(spec, first)).to_dict()
    if spec.metric.startswith("val_") and cfg["data"]["validation"] == 0 and "data.validation" not in spec.search:
        raise SweepError(f"{path}: metric {spec.metric} needs a validation set: set data.validation > 0")
    return spec, base


def _check_model(cfg):
    from .train import ShapeError, make_model

    try:
        make_model(cfg)
    except ShapeError as e:
        raise ConfigError(f"model.layers: {e}") from None


def trial_overrides(spec, params):
    """The KEY=VALUE overrides of one trial: threads, the spec's, then the searched values."""
    return ([f"training.threads={spec.resources.cpus_per_trial}"]
            + [_override(k, v) for k, v in spec.overrides.items()]
            + [_override(k, v) for k, v in params.items()])


def trial_name(index, params):
    """00-lr0.1-momentum0.9: the trial's number, then its searched values by short key."""
    parts = [f"{index:02d}"]
    for key, value in params.items():
        text = str(value)
        if isinstance(value, float):  # 1e-06 -> 1e-6, 1e+06 -> 1e6: '+' cannot name a folder
            text = f"{value:.4g}".replace("e+", "e").replace("e0", "e").replace("e-0", "e-")
        parts.append(key.rsplit(".", 1)[-1] + "".join(c if c.isalnum() or c in "._-" else "_" for c in text))
    return "-".join(parts)


def max_epochs(spec, base):
    """The most epochs any trial can train: ASHA's max_t."""
    dim = spec.search.get("training.epochs")
    if dim is None:
        return load_config(base, trial_overrides(spec, {k: d.values[0] for k, d in spec.search.items()})
                           ).to_dict()["training"]["epochs"]
    return max(dim.values)


# ---- the trial, run by a Ray worker ---------------------------------------------------

def run_trial(params, *, spec, base, sweep_dir, cwd):
    """Train one trial into sweep_dir/<trial>, reporting each epoch to Ray Tune; continue
    it from last.npz when the folder already holds an unfinished run (a resumed sweep)."""
    from ray import tune
    from threadpoolctl import threadpool_limits

    from .checkpoint import CheckpointError
    from .config import dump_yaml
    from .data.datasets import load_dataset
    from .resume import ResumeError, check_fits, prepare_resume
    from .runs import clear_run_files, remove_temporaries, run_lock
    from .train import make_model, prepare_data, train

    os.chdir(cwd)  # relative paths in the config (data.dir) mean what they mean to `cnntrain train`
    index = int(tune.get_context().get_trial_id().rsplit("_", 1)[-1])
    name = trial_name(index, params)
    run_dir = Path(sweep_dir) / name
    overrides = trial_overrides(spec, params)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_lock(run_dir)
    lock.acquire()  # a trial restarted while a killed attempt's process lingers waits here
    with lock, threadpool_limits(spec.resources.cpus_per_trial):
        remove_temporaries(run_dir)
        resumed = None
        done = _finished_row(run_dir)
        if done is not None:  # finished, but killed before Ray heard of it: tell Ray now
            tune.report(done)
            return
        if (run_dir / "checkpoints" / "last.npz").exists():
            try:
                resumed = prepare_resume(run_dir, [])
            except (ResumeError, CheckpointError, ConfigError):
                resumed = None  # not resumable: train it again from the start
        if resumed is None:
            clear_run_files(run_dir)
            cfg_obj = load_config(base, overrides + [f"name={name}"])
            cfg = cfg_obj.to_dict()
            model = make_model(cfg)
            kwargs = dict(summary={"overrides": overrides, "init": None})
        else:
            cfg_obj, cfg, model = resumed.cfg_obj, resumed.cfg, resumed.model
            kwargs = dict(state=resumed.state, velocity=resumed.velocity, summary=resumed.summary,
                          restore_rows=resumed.restore_rows)
        kwargs["summary"]["sweep"] = {"name": spec.name, "trial": name, "params": params}
        d = cfg["data"]
        dataset = load_dataset(d["dataset"], d["dir"], fallback=d["fallback"], mirrors=d["mirrors"],
                               quiet=True)
        splits = prepare_data(cfg, dataset, model)
        if resumed is not None:
            check_fits(resumed, run_dir, resumed.summary.get("data", {}), dataset.info(),
                       len(splits["train"][0]))
        epochs = cfg["training"]["epochs"]

        def report(event, **row):
            # the last epoch is reported after the test, so that the scheduler's verdict on
            # it cannot cut a finished run short of its test results
            if event == "epoch_end" and row["epoch"] < epochs:
                tune.report(_ray_metrics(row))

        try:
            train(cfg, model, splits, run_dir, dataset.info(), report, config_yaml=dump_yaml(cfg_obj),
                  plots=spec.plots, **kwargs)
        except FloatingPointError:
            return  # summary.json says diverged; a sweep expects some learning rates to fail
        tune.report(_finished_row(run_dir))


def _ray_metrics(row):
    return {k: row.get(k) for k in ("epoch", *METRICS) if row.get(k) is not None}


def _finished_row(run_dir):
    """The last epoch's metrics and the test accuracy of a completed run, else None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") != "completed":
        return None
    return {**_ray_metrics(_last_row(run_dir) or {}), "test_acc": summary["test_acc"]}


def _last_row(run_dir):
    from .runs import read_metrics

    rows = read_metrics(Path(run_dir) / "metrics.csv")
    return rows[-1] if rows else None


def _mark(run_dir, status, **fields):
    """Set a trial's summary.json status from the driver if it says running (the trial's
    process is gone, or waits to be killed); True if it did."""
    from .runs import write_json

    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if summary.get("status") == "running":
        summary.update(status=status, **fields)
        write_json(path, summary)
        return True
    return False


def _asha(sweep_dir, keys, **kwargs):
    """ASHA that writes its verdict into the trial's folder when it stops a trial: the
    trial is then waiting in tune.report after an epoch, and its process is killed."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class MarkingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                index = int(trial.trial_id.rsplit("_", 1)[-1])
                params = {k: trial.config[k] for k in keys}
                _mark(Path(sweep_dir) / trial_name(index, params), STOPPED, stopped_by="asha")
            return action

    return MarkingASHA(**kwargs)


# ---- the driver ----------------------------------------------------------------------

def param_space(spec):
    from ray import tune

    space = {}
    for key, dim in spec.search.items():
        kind, v = dim.kind, dim.values
        space[key] = {"grid": lambda: tune.grid_search(list(v)), "choice": lambda: tune.choice(list(v)),
                      "randint": lambda: tune.randint(v[0], v[1] + 1),
                      "uniform": lambda: tune.uniform(*v), "loguniform": lambda: tune.loguniform(*v),
                      }[kind]()
    return space


def import_ray():
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise SweepError(f"cnntrain sweep needs Ray Tune, an optional extra: {RAY_EXTRA} "
                         f"(or pip install \"ray[tune]\")", exit_code=1) from None
    return ray


def _trainable(spec, base, sweep_dir, cwd):
    from functools import partial

    from ray import tune

    fn = partial(_trial_entry, spec=spec.model_dump(mode="json"), base=str(base),
                 sweep_dir=str(sweep_dir), cwd=cwd)
    return tune.with_resources(fn, {"cpu": spec.resources.cpus_per_trial})


def _trial_entry(config, *, spec, base, sweep_dir, cwd):
    params = {k: config[k] for k in spec["search"]}  # in the spec's order, as the callback names them
    run_trial(params, spec=Spec.model_validate(spec), base=base, sweep_dir=sweep_dir, cwd=cwd)


def start_ray(ray, address, cpus):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cpus, **kwargs)


def local_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_sweep(spec, base, sweep_dir, *, resume=False, max_concurrent=None):
    """Run (or, with resume, continue) the sweep's trials with Ray Tune, already started.
    Returns True if every trial came to an end, False if the sweep was interrupted."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep_dir = Path(sweep_dir).resolve()
    cwd = os.getcwd()
    trainable = _trainable(spec, base, sweep_dir, cwd)
    ray_dir = sweep_dir / RAY_DIR
    if resume:
        tuner = tune.Tuner.restore(str(ray_dir), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        space = param_space(spec)
        scheduler = None
        if spec.scheduler != "fifo":
            asha = spec.scheduler if not isinstance(spec.scheduler, str) else Asha(type="asha")
            scheduler = _asha(sweep_dir, list(spec.search), time_attr="epoch", max_t=max(max_epochs(spec, base), asha.grace_period),
                                      grace_period=asha.grace_period,
                                      reduction_factor=asha.reduction_factor)
        mode = spec.mode or _DEFAULT_MODE[spec.metric]
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=spec.metric, mode=mode, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=spec.seed),
                                        num_samples=spec.samples, reuse_actors=False,
                                        max_concurrent_trials=max_concurrent,
                                        trial_name_creator=lambda t: t.trial_id,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=RAY_DIR, storage_path=str(sweep_dir), verbose=0),
        )
    tuner.fit()
    # Tune answers Ctrl-C by killing the running trials and saving its state: their
    # summary.json still says running, and trials not yet started have no folder
    from .runs import is_locked

    interrupted = False
    for summary in sweep_dir.glob("*/summary.json"):
        if not is_locked(summary.parent) and _mark(summary.parent, "interrupted",
                                                   interrupted_by="SIGINT (sweep)"):
            interrupted = True
    started = sum(1 for p in sweep_dir.glob("*/summary.json"))
    return not interrupted and started == count_trials(spec)


def count_trials(spec):
    """Every grid point, `samples` times."""
    n = spec.samples
    for dim in spec.search.values():
        n *= len(dim.grid) if dim.kind == "grid" else 1
    return n


# ---- the results ---------------------------------------------------------------------

def save_spec(spec, base, sweep_dir):
    """sweep.yaml in the sweep folder: the spec with its base made absolute, for --resume."""
    import yaml

    from .runs import write_text

    data = spec.model_dump(mode="json", exclude_defaults=False)
    data["base"] = str(base)
    data["search"] = {k: {d.kind: list(d.values)} for k, d in spec.search.items()}
    write_text(Path(sweep_dir) / "sweep.yaml", yaml.safe_dump(data, sort_keys=False))


def summarize(spec, sweep_dir):
    """Every trial folder's outcome, best first by the spec's metric (its last epoch);
    written to sweep.json and returned as that dict."""
    from .runs import is_locked, write_json

    mode = spec.mode or _DEFAULT_MODE[spec.metric]
    trials = []
    for run in sorted(p for p in Path(sweep_dir).iterdir() if (p / "summary.json").is_file()):
        try:
            summary = json.loads((run / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {"status": "unreadable"}
        status = summary.get("status")
        if status == "running" and not is_locked(run):
            status = "killed"
        row = _last_row(run) or {}
        trials.append({
            "trial": run.name, "run_dir": str(run), "status": status,
            "params": summary.get("sweep", {}).get("params", {}),
            "overrides": summary.get("overrides", []),
            "epochs": summary.get("epochs"), "planned_epochs": summary.get("planned_epochs"),
            spec.metric: row.get(spec.metric), "best_val_acc": summary.get("best_val_acc"),
            "test_acc": summary.get("test_acc"),
        })
    scored = [t for t in trials if t[spec.metric] is not None]
    scored.sort(key=lambda t: t[spec.metric], reverse=mode == "max")
    trials = scored + [t for t in trials if t[spec.metric] is None]
    result = {"name": spec.name, "sweep_dir": str(sweep_dir), "metric": spec.metric, "mode": mode,
              "best": scored[0] if scored else None, "trials": trials}
    write_json(Path(sweep_dir) / "sweep.json", result)
    return result


def sweep_table(result, keys):
    """A rich Table of the trials, best first; a column per search key."""
    from rich.table import Table

    metric = result["metric"]
    table = Table(title=f"sweep {result['name']}: {len(result['trials'])} trials, by {metric} "
                        f"(last epoch, {result['mode']})")
    table.add_column("trial")
    table.add_column("status")
    for key in keys:
        table.add_column(key, justify="right")
    for name in ("epochs", metric, "best val acc", "test acc"):
        table.add_column(name, justify="right")

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    for t in result["trials"]:
        value = t[metric]
        shown = "-" if value is None else (pct(value) if metric.endswith("acc") else f"{value:.4f}")
        table.add_row(t["trial"], t["status"] or "?",
                      *[_show(t["params"][k]) if k in t["params"] else "-" for k in keys],
                      "-" if t["epochs"] is None else f"{t['epochs']}/{t['planned_epochs']}",
                      shown, pct(t["best_val_acc"]), pct(t["test_acc"]))
    return table
