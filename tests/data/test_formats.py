"""Caption-dataset readers on messy, generated data: convert what we can, skip and count the rest."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lmfusion.data import (
    DataStats,
    HFDiskCaptions,
    ImageFolderCaptions,
    ImageFolderWriter,
    NoUsableDataError,
    WebDatasetCaptions,
    collate_records,
    detect_format,
    open_caption_dataset,
)

SIZE = 16


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise))
    return data[: len(data) // 2]


def sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16)))


GOOD_IMAGES = {  # file name -> encoded bytes that should all load
    "rgb.png": encode(Image.new("RGB", (20, 20), (200, 10, 10))),
    "rgba.png": encode(Image.new("RGBA", (20, 20), (0, 0, 0, 0))),
    "grey.png": encode(Image.new("L", (20, 20), 90)),
    "palette.png": encode(Image.new("P", (20, 20), 3)),
    "deep.png": sixteen_bit_png(),
    "odd.jpg": encode(Image.new("RGB", (37, 81), (10, 200, 10)), "JPEG"),
}
BAD_IMAGES = {"corrupt.png": b"definitely not a png", "truncated.png": truncated_png(), "empty.png": b""}


def assert_record(record, caption: str | None = None) -> None:
    image, text, meta = record
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert isinstance(text, str) and text and text == text.strip() and isinstance(meta, dict)
    if caption is not None:
        assert text == caption


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    root.mkdir()
    rows = []
    for name, data in {**GOOD_IMAGES, **BAD_IMAGES}.items():
        (root / name).write_bytes(data)
        rows.append({"file_name": name, "text": f"  a picture called {name}  "})
    (root / "nocaption.png").write_bytes(GOOD_IMAGES["rgb.png"])
    (root / "blank.png").write_bytes(GOOD_IMAGES["rgb.png"])
    (root / "alt.png").write_bytes(GOOD_IMAGES["grey.png"])
    rows += [
        {"file_name": "nocaption.png"},
        {"file_name": "blank.png", "text": "   "},
        {"file_name": "alt.png", "caption": "uses the caption field"},
        {"file_name": "missing.png", "text": "the file is gone"},
    ]
    lines = [json.dumps(row) for row in rows] + ["{not json", ""]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_imagefolder_converts_good_and_counts_bad(messy_folder: Path) -> None:
    dataset = ImageFolderCaptions(messy_folder, SIZE)
    assert len(dataset) == len(GOOD_IMAGES) + 1
    captions = {dataset[i].caption for i in range(len(dataset))}
    assert "a picture called rgba.png" in captions and "uses the caption field" in captions
    for index in range(len(dataset)):
        assert_record(dataset[index])
    rgba = next(r for r in (dataset[i] for i in range(len(dataset))) if r.meta["file_name"] == "rgba.png")
    assert torch.allclose(rgba.image, torch.ones(3, SIZE, SIZE))  # transparent -> white
    stats = dataset.stats
    assert stats.seen == len(GOOD_IMAGES) + len(BAD_IMAGES) + 5
    assert stats.ok == len(dataset)
    assert dict(stats.skipped) == {"corrupt": 1, "truncated": 1, "empty_file": 1, "missing_caption": 1,
                                   "empty_caption": 1, "missing_file": 1, "bad_metadata": 1}
    summary = stats.summary()
    assert "missing_file=1" in summary and f"ok={len(dataset)}" in summary


def test_read_records_takes_the_first_usable_records_in_order(messy_folder: Path) -> None:
    from lmfusion.data import read_records

    every = read_records(messy_folder, SIZE)
    dataset = ImageFolderCaptions(messy_folder, SIZE)
    assert [r.caption for r in every] == [dataset[i].caption for i in range(len(dataset))]
    first_two = read_records(messy_folder, SIZE, limit=2)
    assert [r.caption for r in first_two] == [r.caption for r in every[:2]]
    assert all(torch.equal(a.image, b.image) for a, b in zip(first_two, every))


def test_imagefolder_without_validation_replaces_broken_items(messy_folder: Path) -> None:
    dataset = ImageFolderCaptions(messy_folder, SIZE, validate=False)
    assert len(dataset) == len(GOOD_IMAGES) + len(BAD_IMAGES) + 1
    records = [dataset[i] for i in range(len(dataset))]  # never raises
    for record in records:
        assert_record(record)
    assert "corrupt.png" not in {r.meta["file_name"] for r in records}
    assert dataset.stats.skipped["corrupt"] == 1 and dataset.stats.skipped["truncated"] == 1


def test_imagefolder_finds_train_subfolder_and_works_with_dataloader(tmp_path: Path) -> None:
    with ImageFolderWriter(tmp_path / "ds") as writer:
        for index in range(5):
            writer.add(Image.new("RGB", (8, 8), (index * 40, 0, 0)), f"red level {index}", split="train")
        writer.add(Image.new("RGB", (8, 8)), "held out", split="test")
    dataset = open_caption_dataset(tmp_path / "ds", SIZE)
    assert isinstance(dataset, ImageFolderCaptions) and len(dataset) == 5
    images, captions, metas = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_records)))
    assert images.shape == (4, 3, SIZE, SIZE) and captions[1] == "red level 1" and len(metas) == 4


def test_zero_usable_records_raise_with_path_and_counts(tmp_path: Path) -> None:
    root = tmp_path / "hopeless"
    root.mkdir()
    (root / "a.png").write_bytes(b"garbage")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n"
                                         + json.dumps({"file_name": "b.png", "text": ""}) + "\n")
    with pytest.raises(NoUsableDataError) as info:
        ImageFolderCaptions(root, SIZE)
    message = str(info.value)
    assert "hopeless" in message and "corrupt=1" in message and "empty_caption=1" in message


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_reads_shards_and_counts_bad_samples(tmp_path: Path) -> None:
    write_tar(tmp_path / "shard-000.tar", {
        "a.jpg": GOOD_IMAGES["odd.jpg"], "a.txt": b"a tall green thing\n",
        "b.png": GOOD_IMAGES["rgba.png"], "b.caption": b"transparent",
        "c.webp": encode(Image.new("RGB", (9, 9), "blue"), "WEBP"),
        "c.json": json.dumps({"caption": "from json", "id": 7}).encode(),
        "d.png": b"broken", "d.txt": b"corrupt image",
        "e.png": GOOD_IMAGES["grey.png"], "e.txt": b"   ",
    })
    write_tar(tmp_path / "shard-001.tar", {
        "f.jpeg": GOOD_IMAGES["odd.jpg"], "f.txt": "ünïcode".encode(),
        "g.txt": b"caption without an image",
    })
    dataset = WebDatasetCaptions(str(tmp_path / "shard-{000..001}.tar"), SIZE)
    records = list(dataset)
    assert [r.caption for r in records] == ["a tall green thing", "transparent", "from json", "ünïcode"]
    for record in records:
        assert_record(record)
    assert records[2].meta["id"] == 7 and records[0].meta["key"] == "a"
    assert dataset.stats.ok == 4 and dataset.stats.seen == 7
    assert dict(dataset.stats.skipped) == {"corrupt": 1, "empty_caption": 1, "missing_image": 1}
    assert len(list(dataset)) == 4 and dataset.stats.ok == 4  # stats are per pass

    via_glob = open_caption_dataset(str(tmp_path / "shard-*.tar"), SIZE)
    assert isinstance(via_glob, WebDatasetCaptions) and len(list(via_glob)) == 4
    via_dir = open_caption_dataset(tmp_path, SIZE)
    assert isinstance(via_dir, WebDatasetCaptions) and len(via_dir.urls) == 2
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_records)))
    assert batch[0].shape == (3, 3, SIZE, SIZE)


def test_webdataset_missing_and_broken_shards(tmp_path: Path) -> None:
    good = write_tar(tmp_path / "good.tar", {"k.png": GOOD_IMAGES["rgb.png"], "k.txt": b"red"})
    (tmp_path / "bad.tar").write_bytes(b"\x00" * 10 + b"not a tar archive" * 50)
    dataset = WebDatasetCaptions([str(good), str(tmp_path / "bad.tar"), str(tmp_path / "gone.tar")], SIZE)
    assert [r.caption for r in dataset] == ["red"]
    assert dataset.stats.skipped["missing_shard"] == 1 and dataset.stats.skipped["bad_shard"] >= 1

    hopeless = WebDatasetCaptions(str(write_tar(tmp_path / "empty.tar", {"x.txt": b"no image"})), SIZE)
    with pytest.raises(NoUsableDataError, match="empty.tar"):
        list(hopeless)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        WebDatasetCaptions(str(tmp_path / "nothing-*.tar"), SIZE)


def save_hf(path: Path, images: list, texts: list, column: str = "text", split: str | None = None) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), column: datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": images, column: texts}, features=features)
    if split:
        dataset = datasets.DatasetDict({split: dataset})
    dataset.save_to_disk(str(path))
    return path


def test_hf_disk_dataset_roundtrip_with_bad_rows(tmp_path: Path) -> None:
    images = [{"bytes": GOOD_IMAGES[n], "path": None} for n in ("rgb.png", "rgba.png", "deep.png")]
    images += [{"bytes": b"rubbish", "path": None}, {"bytes": GOOD_IMAGES["grey.png"], "path": None}, None]
    texts = ["red square", "nothing at all", "sixteen bit", "corrupt", "  ", "no image"]
    path = save_hf(tmp_path / "hf", images, texts)
    dataset = open_caption_dataset(path, SIZE)
    assert isinstance(dataset, HFDiskCaptions) and len(dataset) == 3
    assert [dataset[i].caption for i in range(3)] == ["red square", "nothing at all", "sixteen bit"]
    assert torch.allclose(dataset[0].image[:, 0, 0], torch.tensor([200, 10, 10]) / 255.0)
    assert abs(float(dataset[2].image.mean()) - 40000 / 65535) < 0.01
    assert dict(dataset.stats.skipped) == {"corrupt": 1, "empty_caption": 1, "missing_image": 1}


def test_hf_disk_dict_split_and_caption_column(tmp_path: Path) -> None:
    images = [{"bytes": GOOD_IMAGES["rgb.png"], "path": None}] * 2
    path = save_hf(tmp_path / "hfdict", images, ["one", "two"], column="caption", split="validation")
    dataset = HFDiskCaptions(path, SIZE)  # falls back to "caption"; only split is used
    assert [dataset[i].caption for i in range(2)] == ["one", "two"]
    with pytest.raises(ValueError, match="columns"):
        HFDiskCaptions(path, SIZE, text_column="prompt")


def test_format_detection_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        open_caption_dataset(tmp_path / "does-not-exist", SIZE)
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="random"):
        open_caption_dataset(tmp_path / "random", SIZE)
    assert detect_format([str(tmp_path / "x.tar")]) == "webdataset"


def test_writer_cleans_up_after_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ImageFolderWriter(tmp_path / "never") as writer:
            writer.add(torch.rand(3, 4, 4), "tensor input works")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_data_stats_summary() -> None:
    stats = DataStats("somewhere")
    stats.accept()
    stats.skip("corrupt")
    stats.note("bad_shard")
    assert stats.summary() == "somewhere: seen=2 ok=1 skipped=2 (bad_shard=1, corrupt=1)"


def test_webdataset_shards_are_split_across_workers(tmp_path: Path) -> None:
    for shard in range(3):
        members = {}
        for key in range(2):
            members[f"s{shard}k{key}.png"] = GOOD_IMAGES["rgb.png"]
            members[f"s{shard}k{key}.txt"] = f"shard {shard} key {key}".encode()
        write_tar(tmp_path / f"part-{shard}.tar", members)
    dataset = WebDatasetCaptions(str(tmp_path / "part-*.tar"), SIZE)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_records)
    captions = [caption for _, batch, _ in loader for caption in batch]
    assert sorted(captions) == sorted(f"shard {s} key {k}" for s in range(3) for k in range(2))
