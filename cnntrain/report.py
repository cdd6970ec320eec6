"""Progress for humans, on stderr: a tqdm bar per epoch on a terminal, one plain line per
epoch anywhere else (CI logs, nohup, pipes), nothing with quiet."""

import sys


class Progress:
    def __init__(self, stream=None, quiet=False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None

    def __call__(self, event, **kw):
        if self.quiet:
            return
        if event == "epoch_start" and self.tty:
            from tqdm import tqdm  # only a terminal pays for the import

            self.bar = tqdm(total=kw["steps"], initial=kw.get("done", 0),
                            desc=f"epoch {kw['epoch']}/{kw['epochs']}",
                            unit="batch", file=self.stream, leave=False, dynamic_ncols=True)
        elif event == "batch" and self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 20 == 0:
                self.bar.set_postfix(loss=f"{kw['loss']:.4f}", refresh=False)
        elif event == "epoch_end":
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self.line(epoch_line(kw))
        elif event == "note":
            self.line(kw["text"])

    def close(self):
        """Drop an unfinished bar (an interrupted epoch) so the next line starts clean."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text):
        if not self.quiet:
            print(text, file=self.stream, flush=True)


def epoch_line(row):
    val = ("" if row["val_acc"] is None
           else f"  val_loss {row['val_loss']:.4f}  val_acc {100 * row['val_acc']:.2f}%")
    return (f"epoch {row['epoch']}/{row['epochs']}  {row['time_s']:.1f}s  "
            f"train_loss {row['train_loss']:.4f}  train_acc {100 * row['train_acc']:.2f}%{val}")


FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")


def class_names(dataset, k):
    """Names for the k classes: Fashion-MNIST's garments, else the digits 0..k-1."""
    if dataset == "fashion-mnist" and k == len(FASHION_MNIST):
        return list(FASHION_MNIST)
    return [str(i) for i in range(k)]


def confusion_table(matrix, names, per_class):
    """A rich Table: one row per true class, its counts by predicted class, its accuracy."""
    from rich.table import Table

    table = Table(title="confusion matrix (rows: true class, columns: predicted)")
    table.add_column("true", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("accuracy", justify="right")
    for k, name in enumerate(names):
        cells = [f"[bold]{n}[/bold]" if j == k else (str(n) if n else "[dim]0[/dim]")
                 for j, n in enumerate(matrix[k])]
        acc = "-" if per_class[k] is None else f"{100 * per_class[k]:.1f}%"
        table.add_row(name, *cells, acc)
    return table


def _percent(x):
    return "-" if x is None else f"{100 * x:.2f}%"


def runs_table(records, differing, title):
    """A rich Table of `cnntrain runs`: one row per run, a column per config key that differs."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("run")
    table.add_column("status")
    for key in differing:
        table.add_column(key, justify="right")
    for name in ("epochs", "best val acc", "test acc", "images/s"):
        table.add_column(name, justify="right")
    colour = {"completed": "green", "running": "cyan", "interrupted": "yellow",
              "stopped_by_scheduler": "yellow",
              "diverged": "red", "failed": "red", "killed": "red"}
    for r in records:
        status = r["status"] or "?"
        epochs = "-" if r["epochs"] is None else f"{r['epochs']}/{r['planned_epochs']}"
        best = _percent(r["best_val_acc"])
        if r["best_epoch"] is not None:
            best += f" (e{r['best_epoch']})"
        table.add_row(
            r["run"], f"[{colour.get(status, 'white')}]{status}[/]",
            *["-" if r["differs"][k] is None else str(r["differs"][k]) for k in differing],
            epochs, best, _percent(r["test_acc"]),
            "-" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}")
    return table


def print_table(table):
    """Print a rich Table on stdout; in a pipe or a file, as wide as it needs, never wrapped."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        wide = console.options.update(max_width=10_000)
        console.width = max(console.width, console.measure(table, options=wide).maximum)
    console.print(table)
