"""Shapes dataset generation and the oracle that scores images against captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from lmfusion.data import ImageFolderCaptions, load_rgb_image
from lmfusion.data.shapes import (
    CELL_PHRASES,
    COLOURS,
    RELATIONS,
    caption_for,
    cell_of,
    generate_shapes_dataset,
    render_scene,
    scene_for_index,
)
from lmfusion.data.shapes_oracle import (
    _flood_components,
    connected_components,
    parse_shapes_caption,
    parse_shapes_image,
    score_caption_faithfulness,
)


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    first = generate_shapes_dataset(tmp_path / "a", 12, size=32, seed=3, progress=False)
    second = generate_shapes_dataset(tmp_path / "b", 12, size=32, seed=3, progress=False)
    other = generate_shapes_dataset(tmp_path / "c", 12, size=32, seed=4, progress=False)
    assert folder_bytes(first) == folder_bytes(second)
    assert folder_bytes(first) != folder_bytes(other)
    assert len(folder_bytes(first)) == 13  # 12 PNGs + metadata.jsonl


def test_scenes_do_not_depend_on_dataset_size(tmp_path: Path) -> None:
    small = read_rows(generate_shapes_dataset(tmp_path / "s", 4, seed=1, progress=False))
    large = read_rows(generate_shapes_dataset(tmp_path / "l", 9, seed=1, progress=False))
    assert small == large[:4]


def test_captions_match_stored_objects(tmp_path: Path) -> None:
    root = generate_shapes_dataset(tmp_path / "d", 60, seed=5, progress=False)
    rows = read_rows(root)
    assert {len(row["objects"]) for row in rows} == {1, 2}
    for row in rows:
        objects, relation = row["objects"], row["relation"]
        assert row["text"] == caption_for(objects, relation)
        parsed, parsed_relation = parse_shapes_caption(row["text"])
        assert parsed_relation == relation
        for want, got in zip(objects, parsed):
            assert {k: want[k] for k in ("shape", "colour", "size")} == \
                {k: got[k] for k in ("shape", "colour", "size")}
            assert want["colour"] in COLOURS and 0 <= want["x"] <= 1 and 0 <= want["y"] <= 1
        if len(objects) == 1:
            phrase = CELL_PHRASES[cell_of(objects[0]["x"], objects[0]["y"])]
            assert row["text"].endswith(phrase)
        else:
            assert relation in RELATIONS and f" {relation} " in row["text"]
            assert (objects[0]["shape"], objects[0]["colour"]) != (objects[1]["shape"], objects[1]["colour"])


def test_split_writes_train_and_test(tmp_path: Path) -> None:
    root = generate_shapes_dataset(tmp_path / "split", 40, size=32, split=True,
                                   test_fraction=0.1, progress=False)
    train, test = read_rows(root / "train"), read_rows(root / "test")
    assert len(train) == 36 and len(test) == 4
    assert sorted(r["index"] for r in train + test) == list(range(40))
    assert all((root / "test" / r["file_name"]).is_file() for r in test)
    dataset = ImageFolderCaptions(root, 32)  # finds train/ by itself
    assert len(dataset) == 36 and dataset[0].meta["objects"] == train[0]["objects"]


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="out"):
        generate_shapes_dataset(target, 3, progress=False)
    assert (target / "keep.txt").read_text() == "precious"
    generate_shapes_dataset(target, 3, progress=False, overwrite=True)
    assert not (target / "keep.txt").exists() and len(read_rows(target)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind
    (tmp_path / "empty").mkdir()
    generate_shapes_dataset(tmp_path / "empty", 2, progress=False)  # empty dir is fine


@pytest.mark.parametrize("size", [64, 128])
def test_oracle_reads_clean_renders_perfectly(size: int) -> None:
    for index in range(120 if size == 64 else 30):
        objects, relation = scene_for_index(11, index)
        image = render_scene(objects, size)
        result = score_caption_faithfulness(image, objects)
        assert result["all_correct"], (index, caption_for(objects, relation), result)
        parsed = parse_shapes_caption(caption_for(objects, relation))
        assert score_caption_faithfulness(image, *parsed)["all_correct"]


def test_oracle_accepts_tensors_from_the_loader(tmp_path: Path) -> None:
    objects, _ = scene_for_index(0, 1)
    path = tmp_path / "x.png"
    render_scene(objects, 64).save(path)
    tensor = load_rgb_image(path, 64)
    assert score_caption_faithfulness(tensor, objects)["all_correct"]
    detected = {(d.shape, d.colour, d.size) for d in parse_shapes_image(tensor)}
    assert detected == {(o["shape"], o["colour"], o["size"]) for o in objects}


def test_oracle_survives_mild_blur() -> None:
    correct = 0
    for index in range(40):
        objects, _ = scene_for_index(2, index)
        blurred = render_scene(objects, 64).filter(ImageFilter.GaussianBlur(0.8))
        correct += score_caption_faithfulness(blurred, objects)["all_correct"]
    assert correct >= 36


def blue_square(x: float = 0.5, y: float = 0.5, size: str = "large") -> dict:
    return {"shape": "square", "colour": "blue", "size": size, "x": x, "y": y}


def test_oracle_rejects_wrong_images() -> None:
    expected = [blue_square()]
    red_circle = render_scene([{**expected[0], "shape": "circle", "colour": "red"}])
    result = score_caption_faithfulness(red_circle, expected)
    assert result["shape"] == 0 and result["colour"] == 0 and not result["all_correct"]

    small = score_caption_faithfulness(render_scene([blue_square(size="small")]), expected)
    assert small["size"] == 0 and small["shape"] == 1 and not small["all_correct"]

    moved = score_caption_faithfulness(render_scene([blue_square(x=1 / 6)]), expected)
    assert moved["position"] == 0 and not moved["all_correct"]

    extra = render_scene([blue_square(), {**blue_square(x=5 / 6), "colour": "green"}])
    assert score_caption_faithfulness(extra, expected)["count"] == 0

    blank = score_caption_faithfulness(render_scene([]), expected)
    assert blank["n_detected"] == 0 and blank["colour"] == 0 and not blank["all_correct"]


def test_oracle_checks_relations() -> None:
    top = {"shape": "circle", "colour": "red", "size": "small", "x": 0.5, "y": 1 / 6}
    bottom = {"shape": "triangle", "colour": "yellow", "size": "large", "x": 0.5, "y": 5 / 6}
    image = render_scene([top, bottom])
    assert score_caption_faithfulness(image, [top, bottom], "above")["all_correct"]
    assert score_caption_faithfulness(image, [top, bottom])["all_correct"]  # inferred from x/y
    wrong = score_caption_faithfulness(image, [top, bottom], "below")
    assert wrong["position"] == 0 and wrong["colour"] == 1 and not wrong["all_correct"]
    objects, relation = parse_shapes_caption("A small red circle to the left of a large yellow triangle.")
    assert relation == "to the left of"
    assert not score_caption_faithfulness(image, objects, relation)["all_correct"]
    with pytest.raises(ValueError):
        parse_shapes_caption("a photo of a cat")


def test_flood_fill_fallback_matches_scipy() -> None:
    mask = np.random.default_rng(0).random((40, 40)) > 0.6
    labels, count = _flood_components(mask)
    assert (labels > 0).sum() == mask.sum()
    ref_labels, ref_count = connected_components(mask)
    assert count == ref_count
    # Same partition: each fallback label maps onto exactly one reference label.
    pairs = set(zip(labels[mask].tolist(), ref_labels[mask].tolist()))
    assert len(pairs) == count


def test_rendered_images_are_white_background_rgb() -> None:
    objects, _ = scene_for_index(0, 0)
    image = render_scene(objects, 48)
    assert image.mode == "RGB" and image.size == (48, 48)
    array = torch.from_numpy(np.array(image))
    assert (array == 255).all(dim=-1).float().mean() > 0.8
