"""Pictures of search results: rows of captioned thumbnails in one PNG (eval.py --show and
image_search.py --grid draw with it).

    save_captioned_grid("q.png", [[("query.jpg", "query", "black"), ("n1.jpg", "cat\\nd=0.12", "green")]])
"""

from PIL import Image, ImageDraw

from deeprank.common import atomic_write
from deeprank.images import load_rgb

CELL = 96       # thumbnail side in pixels
PAD = 4
TEXT_HEIGHT = 26  # two caption lines


def save_captioned_grid(path, rows, cell=CELL):
    """Write a PNG atomically: one row of thumbnails per entry of rows, each cell an
    (image path, caption, colour) with its caption under it. Rows may differ in length."""
    cols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (cols * (cell + PAD) + PAD, len(rows) * (cell + TEXT_HEIGHT + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = PAD + r * (cell + TEXT_HEIGHT + PAD)
        for c, (image_path, caption, colour) in enumerate(row):
            x = PAD + c * (cell + PAD)
            canvas.paste(load_rgb(image_path).resize((cell, cell)), (x, y))
            caption = "\n".join(fitted(draw, line, cell - 4) for line in caption.split("\n"))
            draw.multiline_text((x + 2, y + cell + 1), caption, fill=colour, spacing=1)
    with atomic_write(path, mode="wb") as handle:
        canvas.save(handle, format="PNG")


def fitted(draw, text, width):
    """text cut short with '…' so that it fits width pixels (a long class name must not run into
    the next cell's caption)."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
