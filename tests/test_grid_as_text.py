"""scripts/grid_as_text.py: a sample grid as coloured squares, for the README."""

from pathlib import Path

from PIL import Image, ImageDraw

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "grid_as_text.py"


def grid_script():
    from lmfusion.testing import load_script

    return load_script(SCRIPT)


def test_two_tiles_become_their_colours_in_place(tmp_path):
    grid = Image.new("RGB", (2 + 2 * (32 + 2), 36), "white")  # two 32 px tiles, 2 px padding
    draw = ImageDraw.Draw(grid)
    draw.rectangle([2 + 8, 2 + 8, 2 + 15, 2 + 15], fill=(215, 25, 25))  # red, top left of tile 1
    draw.ellipse([36 + 16, 2 + 16, 36 + 27, 2 + 27], fill=(30, 80, 220))  # blue, bottom right of tile 2
    path = tmp_path / "grid.png"
    grid.save(path)
    lines = grid_script().grid_as_text(path, cell=4, tile=32, pad=2).splitlines()
    left = [line.split(" ")[0] for line in lines]
    right = [line.split(" ")[1] for line in lines]
    assert {c for line in left for c in line} == {"⬜", "🟥"}
    assert {c for line in right for c in line} == {"⬜", "🟦"}
    red_rows = [i for i, line in enumerate(left) if "🟥" in line]
    blue_rows = [i for i, line in enumerate(right) if "🟦" in line]
    assert max(red_rows) < min(blue_rows)  # the red square sits above the blue circle
    assert left[red_rows[0]].index("🟥") < right[blue_rows[0]].index("🟦")


def test_mono_draws_a_light_shape_on_black(tmp_path):
    image = Image.new("RGB", (16, 16), "black")
    ImageDraw.Draw(image).rectangle([8, 0, 15, 15], fill=(200, 200, 200))  # light grey right half
    image.save(tmp_path / "grey.png")
    lines = grid_script().grid_as_text(tmp_path / "grey.png", cell=4, mono=True).splitlines()
    assert lines == ["⬛⬛⬜⬜"] * 4
