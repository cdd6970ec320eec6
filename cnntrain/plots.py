"""results.png and confusion_matrix.png in a run folder, drawn with matplotlib's Agg
backend (no display needed). matplotlib is imported only here, only when drawing, and
without pyplot: a bare Figure needs no global state and imports faster."""

from pathlib import Path

from .checkpoint import write_atomic
from .report import class_names
from .runs import read_metrics


def draw_run_plots(run_dir, matrix, dataset=None):
    """Draw both plots; returns a one-line note when they cannot be drawn, else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "note: matplotlib is not installed: no results.png or confusion_matrix.png"
    run_dir = Path(run_dir)
    draw_results(read_metrics(run_dir / "metrics.csv"), run_dir / "results.png")
    draw_confusion(matrix, class_names(dataset, len(matrix)), run_dir / "confusion_matrix.png")
    return None


def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))


def draw_results(rows, path):
    """Loss and accuracy per epoch, train and validation, side by side."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig = _figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], "o-", label="train")
        val = [(e, r[f"val_{metric}"]) for e, r in zip(epochs, rows) if r[f"val_{metric}"] is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def draw_confusion(matrix, names, path):
    """Test-set counts, true label down, predicted label across."""
    k = len(matrix)
    fig = _figure(figsize=(1.5 + 0.6 * k, 1 + 0.6 * k))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    top = matrix.max() if matrix.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i][j] > top / 2 else "black")
    long_names = max(map(len, names)) > 2
    ax.set_xticks(range(k), names, rotation=45 if long_names else 0,
                  ha="right" if long_names else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix ({int(matrix.sum())} images)")
    _save(fig, path)
