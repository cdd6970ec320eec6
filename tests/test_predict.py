"""`cnntrain predict` and `cnntrain eval`'s per-class accuracy and confusion matrix."""

import json

import numpy as np
import pytest
from PIL import Image

from cnntrain.data.datasets import load_dataset
from cnntrain.predict import _fit, load_inputs
from idx_helpers import write_idx
from test_cli import LENET, cnntrain


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    result = cnntrain("train", LENET, "data.dataset=mnist-sample", "data.train_limit=1000",
                      "data.test_limit=300", "data.validation=0", "training.epochs=1",
                      "training.batch_size=16", "optimizer.momentum=0.9", "--no-plots", "--quiet",
                      cwd=tmp)
    assert result.returncode == 0, result.stderr
    digits = load_dataset("mnist-sample").test_images[:5]  # N, 28, 28, white on black
    return tmp, tmp / "runs" / "lenet" / "checkpoints" / "last.npz", digits


def _predict(ckpt, *files, cwd):
    result = cnntrain("predict", ckpt, *files, "--json", "--top", "10", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["predictions"]


def _probs(pred):
    return {t["class"]: t["prob"] for t in pred["top"]}


def test_idx_and_png_inputs_give_the_same_probabilities(trained):
    tmp, ckpt, digits = trained
    write_idx(tmp / "digits-idx3-ubyte", digits)
    Image.fromarray(digits[0]).save(tmp / "white_on_black.png")
    Image.fromarray(255 - digits[0]).save(tmp / "black_on_white.png")  # as on paper
    preds = _predict(ckpt, tmp / "digits-idx3-ubyte", tmp / "white_on_black.png",
                     tmp / "black_on_white.png", cwd=tmp)
    assert [p["input"] for p in preds[:5]] == [f"{tmp / 'digits-idx3-ubyte'}[{i}]" for i in range(5)]
    # the same pixels (auto-inverted back from black on white); float32 sums may differ
    # in the last bits with the batch they are in
    for other in (preds[5], preds[6]):
        assert _probs(other) == pytest.approx(_probs(preds[0]), abs=1e-6)
    for path in ("white_on_black.png", "black_on_white.png"):
        assert np.array_equal(load_inputs(tmp / path, 28, 28)[0][1], digits[0])
    assert max(_probs(preds[0]).values()) > 0.5  # a model that has learnt something
    for p in preds:
        probs = [t["prob"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1)
        assert p["class"] == p["top"][0]["class"] and p["name"] == str(p["class"])


def test_the_model_agrees_with_eval_on_most_test_digits(trained):
    """The predicted classes are the model's: on the test set they are right as often as
    `eval` says it is."""
    tmp, ckpt, _ = trained
    test = load_dataset("mnist-sample")
    write_idx(tmp / "test-idx3-ubyte", test.test_images[:300])
    preds = _predict(ckpt, tmp / "test-idx3-ubyte", cwd=tmp)
    ev = json.loads(cnntrain("eval", ckpt, "--json", cwd=tmp).stdout)
    right = np.mean([p["class"] == y for p, y in zip(preds, test.test_labels[:300])])
    assert right == ev["test_acc"]


def test_any_size_and_transparency(trained):
    tmp, ckpt, digits = trained
    big = Image.fromarray(255 - digits[1]).resize((56, 84)).convert("RGB")
    big.save(tmp / "big.jpg")
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = digits[2]  # black ink whose opacity is the digit, on nothing
    Image.fromarray(rgba, "RGBA").save(tmp / "ink.png")
    preds = _predict(ckpt, tmp / "big.jpg", tmp / "ink.png", cwd=tmp)
    assert len(preds) == 2
    plain = _predict(ckpt, tmp / "ink.png", cwd=tmp)
    write_idx(tmp / "two-idx3-ubyte", digits[2:3])
    reference = _predict(ckpt, tmp / "two-idx3-ubyte", cwd=tmp)
    assert plain[0]["class"] == reference[0]["class"]


def test_fit_pads_to_the_aspect_ratio_centred():
    bar = Image.fromarray(np.full((20, 10), 255, np.uint8))  # tall: padded left and right
    out = _fit(bar, 28, 28)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out[:, :5].max() < 30 and out[:, -5:].max() < 30 and out[14, 14] > 200
    assert np.array_equal(out, out[:, ::-1])  # centred
    assert np.array_equal(_fit(Image.fromarray(np.eye(28, dtype=np.uint8)), 28, 28),
                          np.eye(28, dtype=np.uint8))  # already the right size: untouched


def test_predict_errors_are_one_line(trained, tmp_path):
    _, ckpt, _ = trained
    (tmp_path / "notes.txt").write_text("not an image")
    for args, code, message in [
        ([tmp_path / "notes.txt"], 1, "neither an image (PNG, JPEG, ...) nor an IDX image file"),
        ([tmp_path / "missing.png"], 1, "missing.png: no such file"),
        ([tmp_path / "notes.txt", "--invert", "maybe"], 2, "--invert: expected auto, yes or no"),
    ]:
        result = cnntrain("predict", ckpt, *args, cwd=tmp_path)
        assert result.returncode == code, result.stderr
        assert result.stderr.startswith("error:") and message in result.stderr
        assert len(result.stderr.splitlines()) == 1
    human = cnntrain("predict", ckpt, tmp_path / "notes.txt", cwd=tmp_path)
    assert "Traceback" not in human.stderr


def test_eval_gives_per_class_accuracy_and_the_confusion_matrix(trained):
    tmp, ckpt, _ = trained
    ev = json.loads(cnntrain("eval", ckpt, "--json", cwd=tmp).stdout)
    assert {"checkpoint", "epoch", "test_acc", "test_loss", "test_images", "data"} <= set(ev)
    matrix = np.array(ev["confusion_matrix"])
    labels = load_dataset("mnist-sample").test_labels[:300]
    assert matrix.shape == (10, 10) and list(matrix.sum(axis=1)) == list(np.bincount(labels, minlength=10))
    assert np.trace(matrix) / 300 == ev["test_acc"]
    assert ev["per_class_acc"] == [matrix[k, k] / matrix[k].sum() for k in range(10)]
    human = cnntrain("eval", ckpt, cwd=tmp)
    assert "confusion matrix" in human.stdout and "accuracy" in human.stdout
    row0 = next(line for line in human.stdout.splitlines() if line.startswith("│    0 │"))
    assert row0.split("│")[-2].strip() == f"{100 * ev['per_class_acc'][0]:.1f}%"
