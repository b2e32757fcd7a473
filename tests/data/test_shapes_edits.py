"""Shapes editing triples (targets re-rendered from their records) and the edit-dataset readers."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image

from lmfusion.data.edits import EditFolder, EditWebDataset, NoUsableDataError, is_edit_dataset, read_edit_records
from lmfusion.data.shapes_edits import EDIT_TYPES, HELDOUT_PHRASES, HELDOUT_RESULTS, PHRASES, generate_shapes_edits
from lmfusion.data.shapes_oracle import parse_shapes_image


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    return generate_shapes_edits(tmp_path_factory.mktemp("edits") / "set", 48, size=64, seed=7, test_fraction=0.25,
                                 progress=False)


def _rows(folder):
    return [json.loads(line) for line in (folder / "edits.jsonl").read_text().splitlines()]


def test_targets_are_the_edited_records_and_sources_the_originals(edits):
    rows = _rows(edits / "train") + _rows(edits / "test")
    assert Counter(r["edit_type"] for r in rows) == Counter({kind: 8 for kind in EDIT_TYPES})
    for folder, split_rows in ((edits / "train", _rows(edits / "train")), (edits / "test", _rows(edits / "test"))):
        for row in split_rows:
            for role in ("source", "target"):
                found = parse_shapes_image(Image.open(folder / row[role]))
                want = row[f"{role}_objects"]
                key = lambda o: (o["shape"] if isinstance(o, dict) else o.shape,  # noqa: E731
                                 o["colour"] if isinstance(o, dict) else o.colour,
                                 o["size"] if isinstance(o, dict) else o.size)
                assert sorted(map(key, found)) == sorted(map(key, want)), (row["instruction"], role)
            if row["edit_type"] == "remove":
                assert len(row["target_objects"]) == len(row["source_objects"]) - 1
            elif row["edit_type"] == "add":
                assert len(row["target_objects"]) == len(row["source_objects"]) + 1
            else:  # exactly one object changed, in the attribute the edit type names
                changed = [i for i, (a, b) in enumerate(zip(row["source_objects"], row["target_objects"])) if a != b]
                assert changed == [row["edited"]]


def test_test_split_holds_unseen_phrasings_and_results_and_train_none(edits):
    train, test = _rows(edits / "train"), _rows(edits / "test")
    heldout_instructions = {p.split("{")[0] for table in HELDOUT_PHRASES.values() for p in table if p.split("{")[0]}
    for row in train:
        assert not row["unseen_phrasing"] and not row["unseen_result"]
        if row["edit_type"] != "remove":
            edited = row["target_objects"][row["edited"]]
            assert (edited["shape"], edited["colour"]) not in HELDOUT_RESULTS
        assert not any(row["instruction"].startswith(h) for h in heldout_instructions if len(h) > 3)
    assert any(r["unseen_phrasing"] for r in test) and any(r["unseen_result"] for r in test)
    for row in test:
        if row["unseen_result"]:
            edited = row["target_objects"][row["edited"]]
            assert (edited["shape"], edited["colour"]) in HELDOUT_RESULTS
    assert set(PHRASES) == set(HELDOUT_PHRASES) == set(EDIT_TYPES)


def test_same_seed_same_files(edits, tmp_path):
    again = generate_shapes_edits(tmp_path / "again", 48, size=64, seed=7, test_fraction=0.25, progress=False)
    assert (again / "train" / "edits.jsonl").read_bytes() == (edits / "train" / "edits.jsonl").read_bytes()
    assert (again / "test" / "images" / "000047_target.png").read_bytes() == \
        (edits / "test" / "images" / "000047_target.png").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        generate_shapes_edits(again, 4, progress=False)


def test_reader_skips_and_counts_bad_rows_and_takes_other_field_names(edits, tmp_path):
    good = _rows(edits / "train")[:2]
    (tmp_path / "images").mkdir()
    for row in good:
        for role in ("source", "target"):
            (tmp_path / row[role]).write_bytes((edits / "train" / row[role]).read_bytes())
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    lines = [json.dumps(good[0]),
             json.dumps({"source_img": good[1]["source"], "target_img": good[1]["target"], "edit": "make it red"}),
             "{not json", json.dumps({"source": good[0]["source"], "target": good[0]["target"], "instruction": "  "}),
             json.dumps({"source": good[0]["source"], "target": "images/missing.png", "instruction": "x"}),
             json.dumps({"source": "images/broken.png", "target": good[0]["target"], "instruction": "x"})]
    (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n")
    dataset = EditFolder(tmp_path, 16)
    assert len(dataset) == 2 and dataset.stats.ok == 2 and dataset.stats.seen == 6
    assert dataset.stats.skipped["bad_metadata"] == 1 and dataset.stats.skipped["empty_instruction"] == 1
    assert dataset.stats.skipped["missing_file"] == 1 and sum(dataset.stats.skipped.values()) == 4
    record = dataset[1]
    assert record.instruction == "make it red" and record.source.shape == (3, 16, 16)
    assert is_edit_dataset(tmp_path) and not is_edit_dataset(tmp_path / "images")
    (tmp_path / "edits.jsonl").write_text(lines[2] + "\n")
    with pytest.raises(NoUsableDataError, match="no usable edit records"):
        EditFolder(tmp_path, 16)


def test_webdataset_edits(edits, tmp_path):
    rows = _rows(edits / "train")[:3]
    shard = tmp_path / "edits-000.tar"
    with tarfile.open(shard, "w") as tar:
        for k, row in enumerate(rows):
            members = {"source.png": (edits / "train" / row["source"]).read_bytes(),
                       "target.png": (edits / "train" / row["target"]).read_bytes(),
                       "instruction.txt": row["instruction"].encode()}
            if k == 2:
                members.pop("target.png")  # a sample without its target: skipped, counted
            for name, blob in members.items():
                info = tarfile.TarInfo(f"{k:04d}.{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    records = read_edit_records(str(shard), 16)
    assert [r.instruction for r in records] == [rows[0]["instruction"], rows[1]["instruction"]]
    dataset = EditWebDataset(str(shard), 16)
    assert len(list(dataset)) == 2 and dataset.stats.skipped["missing_image"] == 1


def test_the_cli_writes_a_set_and_refuses_a_bad_count_in_one_line(tmp_path, capsys):
    from lmfusion.cli import main

    assert main(["data", "shapes-edits", "--out", str(tmp_path / "set"), "--count", "12", "--seed", "2",
                 "--size", "32", "--test-fraction", "0.25"]) == 0
    assert "wrote 12 shapes edits" in capsys.readouterr().out
    assert len(_rows(tmp_path / "set" / "train")) == 9 and len(_rows(tmp_path / "set" / "test")) == 3
    assert Image.open(tmp_path / "set" / "test" / "images" / "000011_source.png").size == (32, 32)
    assert main(["data", "shapes-edits", "--out", str(tmp_path / "other"), "--count", "0"]) == 2
    assert "count must be at least 1" in capsys.readouterr().err
