"""caml.inference.sliding_window_predict against a plain one-window-at-a-time loop with the
official window placement (pad evenly when smaller, ceil((size - patch) / stride) + 1 windows
per axis, last window flush with the end, softmax averaged)."""
import math

import numpy as np
import pytest
import torch

from caml.inference import OFFICIAL_ROI_SIZE, OFFICIAL_STRIDES, sliding_window_predict, window_starts


class PositionAwarePredictor(torch.nn.Module):
    """Logits that depend on the voxel value AND its position inside the window, so a wrong window
    placement, wrong averaging or wrong crop changes the result. Counts calls and windows."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 1.5, num_classes), requires_grad=False)
        self.calls, self.windows = 0, 0

    def forward(self, x):
        self.calls += 1
        self.windows += x.shape[0]
        ramp = sum(torch.linspace(0, 1, n).reshape([-1 if a == i else 1 for a in range(3)])
                   for i, n in enumerate(x.shape[2:]))
        logits = self.weight.reshape(1, -1, 1, 1, 1) * (x.sum(1, keepdim=True) + ramp)
        return logits, "second output ignored"


def naive_sliding_window(image, predictor, roi, strides):
    """One window per call, numpy accumulation, the official loop structure."""
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        image = image[None]
    size = image.shape[1:]
    deficit = [max(r - s, 0) for s, r in zip(size, roi)]
    image = np.pad(image, [(0, 0)] + [(d // 2, d - d // 2) for d in deficit])
    padded = image.shape[1:]
    steps = [math.ceil((p - r) / st) + 1 for p, r, st in zip(padded, roi, strides)]
    scores, counts = None, np.zeros(padded, np.float32)
    for ix in range(steps[0]):
        xs = min(strides[0] * ix, padded[0] - roi[0])
        for iy in range(steps[1]):
            ys = min(strides[1] * iy, padded[1] - roi[1])
            for iz in range(steps[2]):
                zs = min(strides[2] * iz, padded[2] - roi[2])
                window = image[:, xs:xs + roi[0], ys:ys + roi[1], zs:zs + roi[2]]
                prob = torch.softmax(predictor(torch.from_numpy(window[None].copy()))[0], 1)[0].numpy()
                if scores is None:
                    scores = np.zeros((prob.shape[0],) + padded, np.float32)
                scores[:, xs:xs + roi[0], ys:ys + roi[1], zs:zs + roi[2]] += prob
                counts[xs:xs + roi[0], ys:ys + roi[1], zs:zs + roi[2]] += 1
    scores /= counts
    crop = (slice(None),) + tuple(slice(d // 2, d // 2 + s) for d, s in zip(deficit, size))
    return scores[crop]


@pytest.mark.parametrize("size", [(13, 7, 9), (8, 8, 6), (20, 17, 5), (9, 30, 11)])
@pytest.mark.parametrize("sw_batch_size", [1, 3, 64])
def test_matches_naive_loop(size, sw_batch_size):
    roi, strides = (8, 8, 6), (3, 5, 2)
    image = torch.randn(size, generator=torch.Generator().manual_seed(0))
    predictor = PositionAwarePredictor()
    probs, labels = sliding_window_predict(image, predictor, roi, strides, sw_batch_size=sw_batch_size)
    expected = naive_sliding_window(image.numpy(), predictor, roi, strides)
    assert probs.shape == (3,) + size and probs.dtype == torch.float32
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, probs.argmax(0)) and labels.shape == size
    torch.testing.assert_close(probs.sum(0), torch.ones(size))


def test_batching_and_window_count():
    roi, strides, size = (8, 8, 6), (3, 5, 2), (20, 17, 9)
    predictor = PositionAwarePredictor(num_classes=2)
    sliding_window_predict(np.random.rand(*size).astype(np.float32), predictor, roi, strides, sw_batch_size=4)
    windows = len(window_starts(20, 8, 3)) * len(window_starts(17, 8, 5)) * len(window_starts(9, 6, 2))
    assert predictor.windows == windows == 5 * 3 * 3
    assert predictor.calls == math.ceil(windows / 4)


def test_official_window_placement():
    assert OFFICIAL_ROI_SIZE == (112, 112, 80) and OFFICIAL_STRIDES == (18, 18, 4)
    assert window_starts(112, 112, 18) == [0]
    assert window_starts(140, 112, 18) == [0, 18, 28]
    assert window_starts(88, 80, 4) == [0, 4, 8]


def test_channel_first_input_and_plain_callable():
    image = torch.randn(2, 10, 9, 7)  # two input channels
    probs, labels = sliding_window_predict(
        image, lambda x: torch.cat([x[:, :1] * 0, x[:, :1] + x[:, 1:]], 1), (6, 6, 4), (2, 2, 2))
    expected = torch.softmax(torch.stack([torch.zeros_like(image[0]), image[0] + image[1]]), 0)
    torch.testing.assert_close(probs, expected)  # voxelwise predictor: any placement averages to itself
    assert torch.equal(labels, (image[0] + image[1] > 0).long())


def test_bad_predictor_output():
    with pytest.raises(ValueError, match="predictor must return logits"):
        sliding_window_predict(torch.zeros(8, 8, 8), lambda x: x[:, :, :4], (8, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match=r"\[W, H, D\]"):
        sliding_window_predict(torch.zeros(8, 8), lambda x: x, (8, 8, 8), (4, 4, 4))
