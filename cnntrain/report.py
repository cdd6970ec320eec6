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

            self.bar = tqdm(total=kw["steps"], desc=f"epoch {kw['epoch']}/{kw['epochs']}",
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

    def line(self, text):
        if not self.quiet:
            print(text, file=self.stream, flush=True)


def epoch_line(row):
    val = ("" if row["val_acc"] is None
           else f"  val_loss {row['val_loss']:.4f}  val_acc {100 * row['val_acc']:.2f}%")
    return (f"epoch {row['epoch']}/{row['epochs']}  {row['time_s']:.1f}s  "
            f"train_loss {row['train_loss']:.4f}  train_acc {100 * row['train_acc']:.2f}%{val}")
