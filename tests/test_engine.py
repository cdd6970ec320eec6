"""The engine against independent references: finite differences in float64, naive
loops, the seed's per-example update written out by hand, exact known values."""

import numpy as np
import pytest

import reference
from cnntrain.engine import kernels
from cnntrain.engine.layers import LENET5_CONNECTIONS, Conv2D, Dense, MaxPool2D, ShapeError
from cnntrain.engine.loss import softmax_cross_entropy
from cnntrain.engine.model import CHUNK, build_model, chunk_bounds
from cnntrain.engine.optim import SGD

LENET = [
    {"name": "conv1", "type": "conv", "filters": 6, "kernel": 5, "padding": 2, "activation": "relu"},
    {"name": "pool2", "type": "maxpool", "size": 2},
    {"name": "conv3", "type": "conv", "filters": 16, "kernel": 5, "activation": "relu"},
    {"name": "pool4", "type": "maxpool", "size": 2},
    {"name": "ff5", "type": "dense", "units": 120, "activation": "relu"},
    {"name": "ff6", "type": "dense", "units": 84, "activation": "relu"},
    {"name": "output", "type": "dense", "units": 10},
]


def chwn(x):
    """PyTorch's (N, C, H, W) to the engine's (C, H, W, N)."""
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def nchw(x):
    """The engine's (C, H, W, N) to PyTorch's (N, C, H, W)."""
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


def numeric_grad(f, x, eps=1e-6):
    """Centred differences of the scalar f() with respect to every entry of x (in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def check_layer_grads(layer, x, rng, tol=1e-7):
    """Weight the output by a random upstream gradient G and compare every gradient of
    sum(out * G) with centred differences."""
    out = layer.forward(x)
    upstream = rng.standard_normal(out.shape)
    dx = layer.backward(upstream)

    def f():
        return np.sum(layer.forward(x, train=False) * upstream)

    np.testing.assert_allclose(dx, numeric_grad(f, x), rtol=tol, atol=tol)
    for name, w in layer.params.items():
        expected = numeric_grad(f, w)
        if name == "weight" and getattr(layer, "mask", None) is not None:
            # unconnected weights are not parameters: their gradient is zero by definition
            expected[~layer.mask] = 0
        np.testing.assert_allclose(layer.grads[name], expected, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("h,w,c,f,k,pad", [(7, 5, 3, 4, 3, 0), (6, 9, 2, 3, 3, 1), (5, 4, 1, 2, 5, 2),
                                          (8, 6, 3, 2, 2, 0)])
def test_conv_gradients(h, w, c, f, k, pad):
    rng = np.random.default_rng(1)
    layer = Conv2D("conv", (c, h, w), f, k, pad, relu=True, dtype=np.float64, rng=rng)
    check_layer_grads(layer, rng.standard_normal((c, h, w, 2)), rng)


def test_conv_gradients_with_connection_table():
    rng = np.random.default_rng(2)
    layer = Conv2D("conv3", (6, 9, 7), 16, 3, 0, relu=True, connections="lenet5",
                   dtype=np.float64, rng=rng)
    check_layer_grads(layer, rng.standard_normal((6, 9, 7, 2)), rng)
    assert np.all(layer.grads["weight"][~layer.mask] == 0)


@pytest.mark.parametrize("h,w,c,size", [(6, 8, 2, 2), (7, 5, 3, 2), (9, 9, 1, 3), (4, 6, 2, 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_maxpool_gradients(h, w, c, size, relu):
    rng = np.random.default_rng(3)
    layer = MaxPool2D("pool", (c, h, w), size, relu=relu)
    check_layer_grads(layer, rng.standard_normal((c, h, w, 3)), rng)


def test_relu_moved_after_pooling_changes_nothing():
    """conv+ReLU then pool equals conv then pool+ReLU, forward and backward, even with
    the exact ties that ReLU makes (every negative becomes 0)."""
    rng = np.random.default_rng(11)
    conv = Conv2D("conv", (2, 9, 8), 3, 3, 1, relu=True, dtype=np.float64, rng=rng)
    pool = MaxPool2D("pool", (3, 9, 8), 2)
    x = rng.standard_normal((2, 9, 8, 4))
    out_a = pool.forward(conv.forward(x))
    upstream = rng.standard_normal(out_a.shape)
    dx_a = conv.backward(pool.backward(upstream))
    grads_a = {k: v.copy() for k, v in conv.grads.items()}
    conv.relu, pool.relu = False, True
    out_b = pool.forward(conv.forward(x))
    dx_b = conv.backward(pool.backward(upstream))
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_allclose(dx_a, dx_b, rtol=1e-14, atol=1e-15)
    for k in grads_a:
        np.testing.assert_allclose(grads_a[k], conv.grads[k], rtol=1e-14, atol=1e-15)


def test_build_model_moves_conv_relu_onto_the_following_pool():
    model = build_model(LENET, (1, 28, 28), "float32")
    conv1, pool2, conv3, pool4 = model.layers[:4]
    assert (conv1.relu, pool2.relu, conv3.relu, pool4.relu) == (False, True, False, True)


def test_dense_gradients():
    rng = np.random.default_rng(4)
    for relu in (False, True):
        layer = Dense("ff", 7, 5, relu=relu, dtype=np.float64, rng=rng)
        check_layer_grads(layer, rng.standard_normal((4, 7)), rng)


def test_whole_network_gradients_non_square_lenet5():
    """Loss gradient of every parameter of a small LeNet-shaped net on 13x11 images."""
    rng = np.random.default_rng(5)
    specs = [
        {"name": "conv1", "type": "conv", "filters": 6, "kernel": 3, "padding": 1, "activation": "relu"},
        {"name": "pool2", "type": "maxpool", "size": 2},
        {"name": "conv3", "type": "conv", "filters": 16, "kernel": 3, "activation": "relu",
         "connections": "lenet5"},
        {"name": "pool4", "type": "maxpool", "size": 2},
        {"name": "ff5", "type": "dense", "units": 7, "activation": "relu"},
        {"name": "output", "type": "dense", "units": 4},
    ]
    model = build_model(specs, (1, 13, 11), "float64", rng)
    x = rng.random((3, 1, 13, 11))
    y = np.array([0, 3, 1])
    model.loss(x, y)
    grads = {k: v.copy() for k, v in model.grads().items()}

    def f():
        return softmax_cross_entropy(model.forward(x, train=False), y)[0]

    for name, w in model.params().items():
        expected = numeric_grad(f, w)
        if name == "conv3.weight":
            expected[~model.layers[2].mask] = 0  # unconnected: not parameters
        np.testing.assert_allclose(grads[name], expected, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("h,w,c,f,k,pad", [(7, 5, 3, 4, 3, 0), (6, 9, 2, 3, 3, 1), (10, 8, 6, 16, 5, 2)])
def test_conv_forward_matches_naive_loops(h, w, c, f, k, pad):
    rng = np.random.default_rng(6)
    conns = "lenet5" if (c, f) == (6, 16) else "full"
    layer = Conv2D("conv", (c, h, w), f, k, pad, connections=conns, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, c, h, w))
    expected = reference.conv2d(x, layer.params["weight"], layer.params["bias"], pad, layer.mask)
    np.testing.assert_allclose(nchw(layer.forward(chwn(x))), expected, rtol=1e-12, atol=1e-12)


def test_col2im_is_the_adjoint_of_im2col():
    """<im2col(x), y> == <x, col2im(y)> for random x, y: col2im sums overlaps correctly."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 7, 6, 2))
    pad, k = 1, 3
    cols = kernels.im2col(kernels.pad_hw(x, pad), k, k)
    y = rng.standard_normal(cols.shape)
    back = kernels.col2im(y, (3, 9, 8, 2), k, k, pad)
    assert np.isclose(np.sum(cols * y), np.sum(x * back), rtol=1e-12)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("hw", [(7, 8), (8, 6)])  # windows leaving rows out, or tiling
def test_maxpool_matches_naive_loops_with_ties(size, hw):
    """MNIST's blank background makes exact ties common: each window must send its
    gradient to one position only, the first maximum in row-major order."""
    rng = np.random.default_rng(8)
    x = rng.integers(0, 3, size=(3, 2, *hw)).astype(np.float32)  # many exact ties
    x[0, 0] = 0.0  # a whole map of ties
    out_ref, where = reference.maxpool(x, size)
    out, winners = kernels.maxpool_forward(chwn(x), size)
    np.testing.assert_array_equal(nchw(out), out_ref)
    assert np.all(sum(w.astype(int) for w in winners) == 1)  # one winner per window
    dout = rng.standard_normal(out_ref.shape).astype(np.float32)
    dx = kernels.maxpool_backward(chwn(dout), winners, chwn(x).shape, size)
    np.testing.assert_array_equal(nchw(dx), reference.maxpool_backward(dout, where, x.shape))
    # every window passes on exactly its own gradient, once
    assert np.count_nonzero(nchw(dx)) == np.count_nonzero(dout)


def test_maxpool_all_equal_window_picks_top_left():
    x = np.ones((1, 4, 4, 1), dtype=np.float32)  # C, H, W, N
    out, winners = kernels.maxpool_forward(x, 2)
    dx = kernels.maxpool_backward(np.ones_like(out), winners, x.shape, 2)
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 1
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


def test_softmax_cross_entropy_known_values():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    loss, dlogits, probs = softmax_cross_entropy(logits, np.array([0, 1]))
    # p = [1/2, 1/2] and [3/4, 1/4]: loss = (ln 2 + ln 4) / 2
    assert loss == pytest.approx((np.log(2) + np.log(4)) / 2, rel=1e-14)
    np.testing.assert_allclose(dlogits, np.array([[-0.5, 0.5], [0.75, -0.75]]) / 2, rtol=1e-14)
    # large logits stay finite
    loss, d, _ = softmax_cross_entropy(np.array([[1000.0, -1000.0]]), np.array([1]))
    assert loss == pytest.approx(2000.0) and np.all(np.isfinite(d))


def test_lenet5_connection_table_matches_lecun_table_1():
    table = np.zeros((6, 16), dtype=int)  # rows: pool2 maps, columns: conv3 maps, as printed
    for f, maps in enumerate(LENET5_CONNECTIONS):
        table[maps, f] = 1
    printed = ["X   XXX  XXXX XX", "XX   XXX  XXXX X", "XXX   XXX  X XXX",
               " XXX  XXXX  X XX", "  XXX  XXXX XX X", "   XXX  XXXX XXX"]
    np.testing.assert_array_equal(table, [[ch == "X" for ch in row] for row in printed])


def test_unconnected_weights_stay_zero_through_training():
    specs = [dict(s) for s in LENET]
    specs[2]["connections"] = "lenet5"
    model = build_model(specs, (1, 28, 28), "float32", np.random.default_rng(0))
    opt = SGD(model.params(), model.grads(), lr=0.1, momentum=0.9, weight_decay=0.01)
    rng = np.random.default_rng(1)
    for _ in range(5):
        model.loss(rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8))
        opt.step()
    conv3 = model.layers[2]
    w = model.params()["conv3.weight"]
    assert np.all(w[~conv3.mask] == 0) and np.all(w[conv3.mask] != 0)


def test_batch_size_1_matches_the_seed_update_rule():
    """One SGD step on one example equals the seed's loops (tests/reference.py)."""
    rng = np.random.default_rng(9)
    specs = [dict(s) for s in LENET]
    specs[0]["padding"] = 0
    model = build_model(specs, (1, 20, 20), "float64", rng)  # 20 -> 16 -> 8 -> 4 -> 2
    before = {k: v.copy() for k, v in model.params().items()}
    image, label, lr = rng.random((1, 20, 20)), 3, 0.05
    model.loss(image[None], np.array([label]))
    SGD(model.params(), model.grads(), lr).step()
    expected = reference.seed_sgd_step(before, image, label, lr, padding1=0)
    for name, w in model.params().items():
        np.testing.assert_allclose(w, expected[name], rtol=1e-10, atol=1e-12, err_msg=name)
        assert not np.array_equal(w, before[name]), name


def test_batch_gradient_is_the_mean_of_example_gradients():
    rng = np.random.default_rng(10)
    model = build_model(LENET, (1, 28, 28), "float64", rng)
    x, y = rng.random((3, 1, 28, 28)), np.array([1, 7, 7])
    model.loss(x, y)
    batch = {k: v.copy() for k, v in model.grads().items()}
    per_example = []
    for i in range(3):
        model.loss(x[i:i + 1], y[i:i + 1])
        per_example.append({k: v.copy() for k, v in model.grads().items()})
    for name in batch:
        mean = sum(g[name] for g in per_example) / 3
        np.testing.assert_allclose(batch[name], mean, rtol=1e-10, atol=1e-13)


def test_sgd_momentum_and_weight_decay_follow_pytorch_definition():
    w = np.array([1.0, -2.0])
    g = np.array([0.5, 0.25])
    opt = SGD({"w": w}, {"w": g}, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step()  # v1 = g + wd*w0
    v1 = np.array([0.5 + 0.01, 0.25 - 0.02])
    np.testing.assert_allclose(w, [1.0, -2.0] - 0.1 * v1, rtol=1e-15)
    w_before = w.copy()
    opt.step()  # v2 = 0.9 v1 + g + wd*w1
    v2 = 0.9 * v1 + g + 0.01 * w_before
    np.testing.assert_allclose(w, w_before - 0.1 * v2, rtol=1e-15)


def test_float32_stays_float32():
    model = build_model(LENET, (1, 28, 28), "float32", np.random.default_rng(0))
    opt = SGD(model.params(), model.grads(), lr=np.float64(0.05), momentum=0.5)
    logits, = [model.forward(np.random.default_rng(0).random((2, 1, 28, 28)))]
    assert logits.dtype == np.float32
    model.loss(np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32), np.array([1, 2]))
    opt.step()
    assert {v.dtype for v in model.params().values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in opt.velocity.values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("specs,shape,message", [
    ([{"name": "conv1", "type": "conv", "filters": 2, "kernel": 9}, {"name": "output", "type": "dense", "units": 2}],
     (1, 8, 8), "conv1: kernel 9x9 with padding 0 does not fit its input of 1x8x8"),
    ([{"name": "pool2", "type": "maxpool", "size": 3}, {"name": "conv3", "type": "conv", "filters": 2, "kernel": 3},
      {"name": "output", "type": "dense", "units": 2}],
     (1, 8, 7), "conv3: kernel 3x3 with padding 0 does not fit its input of 1x2x2"),
    ([{"name": "conv3", "type": "conv", "filters": 16, "kernel": 3, "connections": "lenet5"},
      {"name": "output", "type": "dense", "units": 2}],
     (3, 8, 8), "conv3: connections lenet5 needs 6 input maps and 16 filters, found 3 input maps"),
    ([{"name": "conv1", "type": "conv", "filters": 2, "kernel": 3, "connections": [[0], [1]]},
      {"name": "output", "type": "dense", "units": 2}],
     (1, 8, 8), "conv1: filter 1 connects to input map 1, but the input has 1 maps"),
    ([{"name": "ff5", "type": "dense", "units": 4}, {"name": "pool", "type": "maxpool", "size": 2},
      {"name": "output", "type": "dense", "units": 2}],
     (1, 8, 8), "pool: a maxpool layer needs an image input"),
])
def test_shape_misfits_name_the_layer_and_both_shapes(specs, shape, message):
    with pytest.raises(ShapeError, match=message):
        build_model(specs, shape)


def test_any_input_size_that_fits_trains():
    for shape in [(1, 8, 8), (1, 32, 32), (3, 12, 10)]:
        specs = [{"name": "conv1", "type": "conv", "filters": 4, "kernel": 3, "activation": "relu"},
                 {"name": "pool2", "type": "maxpool", "size": 2},
                 {"name": "output", "type": "dense", "units": 10}]
        model = build_model(specs, shape, "float32", np.random.default_rng(0))
        opt = SGD(model.params(), model.grads(), lr=0.1)
        rng = np.random.default_rng(1)
        x, y = rng.random((16, *shape), dtype=np.float32), rng.integers(0, 10, 16)
        first = model.loss(x, y)[0]
        for _ in range(30):
            loss = model.loss(x, y)[0]
            opt.step()
        assert loss < first  # it learns (memorises) the batch


def test_chunk_bounds():
    assert chunk_bounds(1) == [(0, 1)]
    assert chunk_bounds(63) == [(0, 63)]
    assert chunk_bounds(64) == [(0, 32), (32, 64)]
    assert chunk_bounds(100) == [(0, 50), (50, 100)]
    assert chunk_bounds(256) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    for n in (64, 65, 129, 1000):
        b = chunk_bounds(n)
        assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
        assert max(hi - lo for lo, hi in b) <= CHUNK


def _whole_batch_grads(model, x, y):
    """The unchunked reference: one forward and backward over the whole batch."""
    logits = model.forward(x, train=True)
    loss, dlogits, _ = softmax_cross_entropy(logits, y)
    model.backward(dlogits)
    return loss, logits, {k: v.copy() for k, v in model.grads().items()}


def test_chunked_loss_equals_the_whole_batch_in_float64():
    rng = np.random.default_rng(12)
    model = build_model(LENET, (1, 28, 28), "float64", rng)
    x, y = rng.random((150, 1, 28, 28)), rng.integers(0, 10, 150)
    loss_ref, logits_ref, grads_ref = _whole_batch_grads(model, x, y)
    loss, logits = model.loss(x, y)  # 150 -> 3 chunks of 50
    assert loss == pytest.approx(loss_ref, rel=1e-13)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-12, atol=1e-15)
    for name, g in model.grads().items():
        np.testing.assert_allclose(g, grads_ref[name], rtol=1e-10, atol=1e-15, err_msg=name)
    np.testing.assert_allclose(model.predict(x), logits_ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype,connections", [("float32", "full"), ("float64", "lenet5")])
def test_worker_processes_do_not_change_a_single_bit(dtype, connections):
    """1, 2 or 3 processes (chunks in helper processes): the same losses, weights and
    logits to the last bit, in float32 and float64, with and without conv3's table."""
    rng = np.random.default_rng(13)
    x, y = rng.random((200, 1, 28, 28)).astype(dtype), rng.integers(0, 10, 200)
    specs = [dict(s) for s in LENET]
    specs[2]["connections"] = connections
    results = []
    for workers in (1, 2, 3):
        model = build_model(specs, (1, 28, 28), dtype, np.random.default_rng(0), workers)
        opt = SGD(model.params(), model.grads(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(3):
            losses.append(model.loss(x, y)[0])
            opt.step()
        results.append((losses, {k: v.copy() for k, v in model.params().items()},
                        model.predict(x)))
        assert (model._helpers is not None) == (workers > 1)  # really in other processes
        model.close()
    for losses, params, logits in results[1:]:
        assert losses == results[0][0]
        np.testing.assert_array_equal(logits, results[0][2])
        for name in params:
            assert np.array_equal(params[name], results[0][1][name]), name


def test_sgd_on_the_models_flat_buffer_equals_sgd_array_by_array():
    """The model's weights are views of one flat buffer, so SGD updates them in one call;
    the bits must be those of the update applied array by array, momentum and state too."""
    model = build_model(LENET, (1, 28, 28), "float32", np.random.default_rng(0))
    assert all(np.shares_memory(w, model.flat_params) for w in model.params().values())
    separate = {k: v.copy() for k, v in model.params().items()}
    flat_opt = SGD(model.params(), model.grads(), lr=0.05, momentum=0.9, weight_decay=0.01)
    assert len(flat_opt._pairs) == 1  # the fast path is really taken
    grads = {k: np.zeros_like(v) for k, v in separate.items()}
    opt = SGD(separate, grads, lr=0.05, momentum=0.9, weight_decay=0.01)
    assert len(opt._pairs) == len(separate)
    rng = np.random.default_rng(3)
    for step in range(3):
        model.loss(rng.random((5, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 5))
        for k, g in model.grads().items():
            grads[k][...] = g
        flat_opt.step()
        opt.step()
    for name, w in model.params().items():
        np.testing.assert_array_equal(w, separate[name], err_msg=name)
    state = flat_opt.state()
    assert set(state) == set(separate)
    for name, v in opt.state().items():
        np.testing.assert_array_equal(state[name], v, err_msg=name)
    restored = SGD(model.params(), model.grads(), lr=0.05, momentum=0.9)
    restored.load_state(state)
    for name, v in restored.state().items():
        np.testing.assert_array_equal(v, state[name], err_msg=name)
    with pytest.raises(ValueError, match="lacks"):
        restored.load_state({"ff5.weight": state["ff5.weight"]})
