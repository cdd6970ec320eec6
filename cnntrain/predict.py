"""Inputs for `cnntrain predict`: PNG/JPEG (anything Pillow reads) or IDX image files,
turned into uint8 (H, W) arrays the size of the model's input, MNIST's way round.

MNIST digits are white (255) on black (0). A photo or scan is usually dark ink on light
paper, so with invert="auto" an image whose border pixels are on average light (> 127)
is inverted. Transparent pixels count as white paper. The image is then padded with the
background to the model's aspect ratio, centred, and resized (Lanczos) to its input.
IDX files are MNIST's own format and are never inverted.
"""

import numpy as np


class InputError(Exception):
    """A file that cannot be read as an image or an IDX image file; the message names it."""


def load_inputs(path, height, width, invert="auto"):
    """[(label, uint8 (height, width) array)] for one file: one entry per image in it."""
    from PIL import Image, UnidentifiedImageError

    from .data.idx import IDXError, read_idx

    try:
        with Image.open(path) as img:
            img.load()
            return [(str(path), _from_image(img, height, width, invert))]
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        pass  # not an image: try IDX
    except (OSError, ValueError) as e:  # a truncated or corrupt image
        raise InputError(f"{path}: unreadable image: {e}") from None
    try:
        images = read_idx(path, "images")  # N, H, W
    except IDXError as e:
        raise InputError(f"{path}: neither an image (PNG, JPEG, ...) nor an IDX image file "
                         f"({e.problem})") from None
    return [(f"{path}[{i}]", _fit(Image.fromarray(a), height, width))
            for i, a in enumerate(images)]


def _from_image(img, height, width, invert):
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)  # photos from phones are often stored sideways
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    gray = np.asarray(img.convert("L"), dtype=np.uint8)  # H, W
    if invert == "auto":
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        invert = "yes" if border.mean() > 127 else "no"
    if invert == "yes":
        gray = 255 - gray
    return _fit(Image.fromarray(gray), height, width)


def _fit(img, height, width):
    """Pad with black to the target's aspect ratio (centred), then resize to it."""
    from PIL import Image

    w, h = img.size
    if (h, w) == (height, width):
        return np.asarray(img, dtype=np.uint8)
    if h * width > w * height:  # too tall: widen
        w_new, h_new = -(-h * width // height), h
    else:
        w_new, h_new = w, -(-w * height // width)
    canvas = Image.new("L", (w_new, h_new), 0)
    canvas.paste(img, ((w_new - w) // 2, (h_new - h) // 2))
    return np.asarray(canvas.resize((width, height), Image.LANCZOS), dtype=np.uint8)


def predict(model, images_u8, batch_size):
    """Class probabilities (N, K) for uint8 (N, H, W) images, in inference mode."""
    from .data.batches import iterate_batches
    from .engine.loss import softmax

    labels = np.zeros(len(images_u8), dtype=np.int64)
    return np.concatenate([softmax(model.forward(x, train=False).astype(np.float64))
                           for x, _ in iterate_batches(images_u8, labels, batch_size, model.dtype)])
