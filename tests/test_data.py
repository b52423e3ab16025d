"""caml.data: the LA h5 layout, the synthetic generator, transforms and the two-stream sampler."""
import json
import os

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from caml.data import (CenterCrop, Compose, LAHeartH5, RandomCrop, RandomRotFlip, ToTensor, TwoStreamBatchSampler,
                       case_path, iterate_eternally, load_case, read_case_list, write_case)
from caml.data import synthetic
from caml.metrics import dice

SMALL = dict(min_shape=(40, 36, 24), max_shape=(48, 44, 30))


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return synthetic.generate_synthetic_la(str(tmp_path_factory.mktemp("synth")), cases=5, seed=7, **SMALL)


def read_all(root, split):
    return [load_case(case_path(root, c)) for c in read_case_list(root, split)]


# ---------------------------------------------------------------- synthetic generator

def test_synthetic_layout_and_content(synth_root):
    assert read_case_list(synth_root, "train") == [f"synth_{i:03d}" for i in range(4)]
    assert read_case_list(synth_root, "test") == ["synth_004"]
    shapes = set()
    for image, label in read_all(synth_root, "train") + read_all(synth_root, "test"):
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert all(lo <= s <= hi for s, lo, hi in zip(image.shape, SMALL["min_shape"], SMALL["max_shape"]))
        assert set(np.unique(label)) == {0, 1} and 0.02 < label.mean() < 0.3
        assert abs(image.mean()) < 1e-3 and abs(image.std() - 1) < 1e-3  # z-scored like mri_norm2.h5
        shapes.add(image.shape)
    assert len(shapes) > 1
    with open(os.path.join(synth_root, "synthetic.json")) as f:
        assert json.load(f)["seed"] == 7


def test_synthetic_deterministic_per_seed(synth_root, tmp_path):
    again = synthetic.generate_synthetic_la(str(tmp_path / "again"), cases=3, seed=7, test_cases=1, **SMALL)
    for (img_a, lab_a), (img_b, lab_b) in zip(read_all(synth_root, "train")[:2], read_all(again, "train")):
        np.testing.assert_array_equal(img_a, img_b)  # case i depends only on (seed, i)
        np.testing.assert_array_equal(lab_a, lab_b)
    other = synthetic.make_case(np.random.default_rng([8, 0]), (40, 40, 24))[1]
    assert not np.array_equal(other, synthetic.make_case(np.random.default_rng([7, 0]), (40, 40, 24))[1])


def test_synthetic_needs_context_not_a_threshold():
    """Distractors as bright as the target: no global threshold segments it well."""
    image, label = synthetic.make_case(np.random.default_rng([0, 0]), (96, 96, 64))
    best = max(dice(image > t, label) for t in np.quantile(image, np.linspace(0.6, 0.995, 40)))
    assert best < 0.85


def test_ensure_synthetic_regenerates_only_when_needed(tmp_path):
    root = str(tmp_path / "d")
    synthetic.ensure_synthetic_la(root, cases=2, seed=1, **SMALL)
    stamp = os.path.getmtime(case_path(root, "synth_000"))
    synthetic.ensure_synthetic_la(root, cases=2, seed=1, **SMALL)
    assert os.path.getmtime(case_path(root, "synth_000")) == stamp
    synthetic.ensure_synthetic_la(root, cases=2, seed=2, **SMALL)
    with open(os.path.join(root, "synthetic.json")) as f:
        assert json.load(f)["seed"] == 2


def test_synthetic_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--cases", "2", "--seed", "3",
                    "--min-shape", "32", "32", "20", "--max-shape", "32", "32", "20"])
    assert "wrote 2 synthetic cases" in capsys.readouterr().out
    assert load_case(case_path(str(tmp_path), "synth_001"))[0].shape == (32, 32, 20)
    with pytest.raises(SystemExit) as info:  # the exit status of python -m caml.data.synthetic
        raise SystemExit(synthetic.main(["--out", str(tmp_path), "--cases", "1"]))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[0].startswith("python -m caml.data.synthetic: error:")


# ---------------------------------------------------------------- LA h5 dataset

def test_dataset_items(synth_root):
    dataset = LAHeartH5(synth_root, "train", num=3)
    assert len(dataset) == 3 and dataset.cases == ["synth_000", "synth_001", "synth_002"]
    item = dataset[1]
    assert item["case"] == "synth_001" and item["image"].dtype == np.float32 and item["label"].dtype == np.uint8
    assert len(LAHeartH5(synth_root, "test")) == 1


def test_dataset_errors(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="LA data folder not found"):
        LAHeartH5(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="train.list"):
        LAHeartH5(root)
    with pytest.raises(ValueError, match="split"):
        LAHeartH5(root, split="val")
    (tmp_path / "train.list").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        LAHeartH5(root)
    (tmp_path / "train.list").write_text("good\r\nmissing\n")
    write_case(root, "good", np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))
    with pytest.raises(FileNotFoundError, match="missing"):
        LAHeartH5(root)

    (tmp_path / "train.list").write_text("good\ncorrupt\nnolabel\nmismatch\n")
    corrupt = case_path(root, "corrupt")
    os.makedirs(os.path.dirname(corrupt))
    with open(corrupt, "wb") as f:
        f.write(b"not an h5 file")
    for name, content in (("nolabel", {"image": np.zeros((4, 4, 4), np.float32)}),
                          ("mismatch", {"image": np.zeros((4, 4, 4), np.float32), "label": np.zeros((4, 4, 5))})):
        os.makedirs(os.path.dirname(case_path(root, name)))
        with h5py.File(case_path(root, name), "w") as f:
            for key, value in content.items():
                f[key] = value
    dataset = LAHeartH5(root)
    assert dataset[0]["image"].shape == (4, 4, 4)
    for index, pattern in ((1, "cannot read h5 file"), (2, "lacks"), (3, "one shape")):
        with pytest.raises(ValueError, match=pattern) as info:
            dataset[index]
        message = str(info.value)
        assert dataset.cases[index] in message and "\n" not in message


# ---------------------------------------------------------------- transforms

def rot_flip_candidates(x):
    return [np.flip(np.rot90(x, k, axes=(-3, -2)), axis) for k in range(4) for axis in (-3, -2)]


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("channels", [None, 2])
def test_random_rot_flip(as_torch, channels):
    shape = (6, 6, 4) if channels is None else (channels, 6, 6, 4)
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    label = (image[0] if channels else image) > 0
    convert = torch.from_numpy if as_torch else (lambda a: a)
    transform = RandomRotFlip(generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(60):
        out = transform({"image": convert(image), "label": convert(label), "case": "c"})
        out_image, out_label = np.asarray(out["image"]), np.asarray(out["label"])
        assert out["case"] == "c" and isinstance(out["image"], torch.Tensor) == as_torch
        matches = [i for i, c in enumerate(rot_flip_candidates(image)) if np.array_equal(c, out_image)]
        assert matches
        seen.update(matches)
        np.testing.assert_array_equal(out_label, (out_image[0] if channels else out_image) > 0)
    # rotation then a flip always yields one of the 4 mirror images of the xy square (as the official)
    assert len({tuple(np.asarray(rot_flip_candidates(image)[i]).ravel()) for i in seen}) == 4


def test_random_crop_positions_padding_and_seed():
    image = np.arange(10 * 9 * 7, dtype=np.float32).reshape(10, 9, 7)
    label = (image % 3 == 0).astype(np.uint8)
    crop = RandomCrop((8, 8, 6), generator=torch.Generator().manual_seed(1))
    starts = set()
    for _ in range(80):
        out = crop({"image": image, "label": label})
        assert out["image"].shape == (8, 8, 6) and out["label"].shape == (8, 8, 6)
        start = np.argwhere(image == out["image"][0, 0, 0])[0]
        np.testing.assert_array_equal(out["image"], image[start[0]:start[0] + 8, start[1]:start[1] + 8, start[2]:start[2] + 6])
        np.testing.assert_array_equal(out["label"], (out["image"] % 3 == 0))
        starts.add(tuple(start))
    assert starts == {(x, y, z) for x in range(3) for y in range(2) for z in range(2)}  # every start possible

    a = RandomCrop((4, 4, 4), generator=torch.Generator().manual_seed(5))({"image": image, "label": label})
    b = RandomCrop((4, 4, 4), generator=torch.Generator().manual_seed(5))({"image": image, "label": label})
    np.testing.assert_array_equal(a["image"], b["image"])

    small = torch.ones(5, 12, 3)  # smaller than the patch along two axes: zero padding
    out = RandomCrop((8, 8, 8), generator=torch.Generator().manual_seed(0))({"image": small, "label": small.byte()})
    assert out["image"].shape == (8, 8, 8) and out["image"].sum() == 5 * 8 * 3
    assert out["image"][:1].sum() == 0 and out["image"][:, :, :2].sum() == 0  # pad 1|2 (x) and 2|3 (z)


def test_center_crop_and_to_tensor():
    image = np.random.default_rng(0).standard_normal((11, 8, 3)).astype(np.float32)
    out = CenterCrop((6, 8, 5))({"image": image, "label": image > 0})
    np.testing.assert_array_equal(out["image"][:, :, 1:4], image[2:8])  # round(5 / 2) = 2 (as the official)
    tensors = ToTensor()(out)
    assert tensors["image"].shape == (1, 6, 8, 5) and tensors["image"].dtype == torch.float32
    assert tensors["label"].shape == (6, 8, 5) and tensors["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="spatial shapes differ"):
        CenterCrop((2, 2, 2))({"image": image, "label": image[:-1] > 0})


# ---------------------------------------------------------------- two-stream sampler

def test_two_stream_batches():
    labeled, unlabeled = list(range(4)), list(range(4, 14))
    sampler = TwoStreamBatchSampler(labeled, unlabeled, batch_size=4, secondary_batch_size=2,
                                    generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(sampler) == len(batches) == 2
    assert all(len(b) == 4 and set(b[:2]) <= set(labeled) and set(b[2:]) <= set(unlabeled) for b in batches)
    assert sorted(i for b in batches for i in b[:2]) == labeled  # one pass over the labeled cases

    again = TwoStreamBatchSampler(labeled, unlabeled, 4, 2, generator=torch.Generator().manual_seed(0))
    assert list(again) == batches and list(again) != batches  # seeded; later epochs reshuffle

    stream = iterate_eternally(unlabeled, torch.Generator().manual_seed(3))
    first, second = [next(stream) for _ in range(10)], [next(stream) for _ in range(10)]
    assert sorted(first) == sorted(second) == unlabeled  # whole permutations back to back


def test_two_stream_errors():
    with pytest.raises(ValueError, match="primary"):
        TwoStreamBatchSampler([0], [1, 2, 3], batch_size=4, secondary_batch_size=2)
    with pytest.raises(ValueError, match="secondary_batch_size"):
        TwoStreamBatchSampler([0, 1], [2], batch_size=4, secondary_batch_size=2)
    with pytest.raises(ValueError, match="primary"):
        TwoStreamBatchSampler([0, 1], [2, 3], batch_size=2, secondary_batch_size=2)


def test_training_pipeline(synth_root):
    torch.manual_seed(0)
    transform = Compose([RandomRotFlip(), RandomCrop((32, 32, 16)), ToTensor()])
    dataset = LAHeartH5(synth_root, "train", transform=transform)
    sampler = TwoStreamBatchSampler([0, 1], [2, 3], batch_size=4, secondary_batch_size=2,
                                    generator=torch.Generator().manual_seed(0))
    batch = next(iter(DataLoader(dataset, batch_sampler=sampler, num_workers=0)))
    assert batch["image"].shape == (4, 1, 32, 32, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 32, 32, 16) and batch["label"].dtype == torch.int64
    assert set(batch["case"][:2]) <= {"synth_000", "synth_001"}


def test_run_batches_are_the_same_for_any_worker_count_and_resume_point(synth_root):
    """TrainBatches.stream: one loader for the run; the batches (cases, crops, flips, epochs) depend only
    on (seed, rank, iteration), not on the workers, and stream(k) is stream(0) from its k-th batch on."""
    from caml.config import preset_config
    from caml.data.batches import TrainBatches
    from caml.data.source import open_source

    cfg = preset_config("tiny")
    cfg.labeled, cfg.batch_size, cfg.labeled_bs, cfg.patch_size = 2, 3, 1, (32, 32, 16)

    def batches(workers, start, count):
        cfg.num_workers = workers
        stream = TrainBatches(cfg, open_source(synth_root), rank=0).stream(start)
        return [next(stream) for _ in range(count)]

    straight, threaded, resumed = batches(0, 0, 7), batches(2, 0, 7), batches(0, 3, 4)
    per_epoch = 2  # 2 labeled cases, 1 per batch
    assert [int(b["epoch"][0]) for b in straight] == [i // per_epoch for i in range(7)]
    for a, b in zip(straight, threaded):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["idx"].tolist() == b["idx"].tolist()
    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a["image"], b["image"]) and a["idx"].tolist() == b["idx"].tolist()
    assert not torch.equal(straight[0]["image"], straight[per_epoch]["image"])  # fresh draws each epoch


# ---------------------------------------------------------------- LA h5 values


def _write_h5(root, case, image, label) -> str:
    path = case_path(str(root), case)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label
    return path


@pytest.mark.parametrize("values", [(0, 255), (0, 1, 2), (0.0, 0.5)])
def test_la_labels_other_than_0_and_1_are_rejected(tmp_path, values):
    from caml.data.source import LASource

    label = np.zeros((4, 4, 4), np.asarray(values).dtype)
    label.flat[: len(values)] = values
    path = _write_h5(tmp_path, "case", np.zeros((4, 4, 4), np.float32), label)
    (tmp_path / "train.list").write_text("case\n")
    (tmp_path / "test.list").write_text("case\n")
    for read in (lambda: load_case(path), lambda: LASource(str(tmp_path)).check(["case"])):
        with pytest.raises(ValueError, match="label values") as info:
            read()
        assert path in str(info.value) and "\n" not in str(info.value)


def test_la_label_mapping_is_explicit(tmp_path):
    label = np.zeros((4, 4, 4), np.uint8)
    label[1:3] = 255
    path = _write_h5(tmp_path, "case", np.zeros((4, 4, 4), np.float32), label)
    image, mapped = load_case(path, label_values=(0, 255))
    assert mapped.dtype == np.uint8 and np.array_equal(mapped, (label == 255).astype(np.uint8))
    with pytest.raises(ValueError, match="label values"):
        load_case(path, label_values=(0, 7))


def test_la_non_finite_image_voxels_are_rejected(tmp_path):
    image = np.zeros((4, 4, 4), np.float32)
    image[1, 2, 3] = np.nan
    path = _write_h5(tmp_path, "case", image, np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="not finite") as info:
        load_case(path)
    assert path in str(info.value)


def test_case_names_in_lists_are_names(tmp_path):
    for name in ("../../x/evil", "a/b", "..", "/abs"):
        (tmp_path / "test.list").write_text(f"ok\n{name}\n")
        with pytest.raises(ValueError, match="not a plain name") as info:
            read_case_list(str(tmp_path), "test")
        assert str(tmp_path / "test.list") in str(info.value) and repr(name) in str(info.value)
