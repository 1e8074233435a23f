"""The built-in suite of procedural visual puzzles (in the spirit of BLINK and VisualPuzzles).

Every image is a G x G grid of cells on a black background, each cell one uniformly coloured
``cell`` x ``cell`` pixel square. The default 8-pixel cells line up with the tokens a Qwen2-VL
vision tower emits (4-pixel patches merged 2 x 2): one cell, one image token. With 4-pixel
cells a token mixes four cells, and a tiny model trained for minutes on a CPU learns nothing. Every puzzle is multiple choice, and its answer needs an intermediate
that the question does not state: a count, a position, a rule. That intermediate is what the
latent block can carry; and since the answer is a single word, a posterior that sees it can
encode it into z outright, which is the leakage AMVL is built to stop.

Families:
    counting      how many cells of colour c?                       (count of c)
    comparison    are there more cells of colour a or of colour b?  (both counts)
    spatial       where is the a cell relative to the b cell?       (both positions)
    odd_one_out   which colour appears exactly once?                (all colour counts)
    pattern       a row repeats a colour cycle; what colour is hidden under the grey cell?
                                                                   (the cycle)

Examples are ``{"id", "family", "images": [PIL.Image], "question", "choices", "answer"}`` and
are reproducible from (seed, split, index): the splits draw from disjoint seed streams.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
          "yellow": (240, 220, 40), "purple": (160, 60, 200)}
GREY = (128, 128, 128)
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
DIRECTIONS = ["left", "right", "above", "below"]
SPLITS = {"train": 0, "val": 1, "test": 2}
FAMILIES = ("counting", "comparison", "spatial", "odd_one_out", "pattern")
MIN_GRID = 4  # odd_one_out places up to 10 shapes; a pattern of period 3 hides a cell past 3


class PuzzleCanvas:
    """A G x G grid of colour names (None = empty) rendered to an RGB image."""

    def __init__(self, grid: int, cell: int):
        self.grid, self.cell = grid, cell
        self.cells: dict[tuple[int, int], str | tuple[int, int, int]] = {}

    def free_cells(self, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
        """``n`` distinct empty cells as (row, column), drawn with ``rng``; ValueError when
        fewer than ``n`` are empty."""
        free = [(r, c) for r in range(self.grid) for c in range(self.grid)
                if (r, c) not in self.cells]
        picks = rng.choice(len(free), size=n, replace=False)
        return [free[i] for i in picks]

    def render(self) -> Image.Image:
        """The grid as an RGB image ``grid * cell`` pixels a side: each filled cell a square of
        its colour (a ``COLORS`` name or an RGB tuple), empty cells black."""
        pixels = np.zeros((self.grid * self.cell, self.grid * self.cell, 3), dtype=np.uint8)
        for (r, c), color in self.cells.items():
            rgb = COLORS[color] if isinstance(color, str) else color
            pixels[r * self.cell:(r + 1) * self.cell, c * self.cell:(c + 1) * self.cell] = rgb
        return Image.fromarray(pixels)


TEMPLATES = {
    "counting": "how many {c} cells are there ?",
    "comparison": "are there more {a} or {b} cells ?",
    "spatial": "where is the {a} cell relative to the {b} cell ?",
    "odd_one_out": "which colour appears exactly once ?",
    "pattern": "which colour is hidden under the grey cell ?",
}


def _options(question: str, choices: list[str]) -> str:
    return f"{question} options : " + " , ".join(choices)


def _counting(rng, canvas):
    target, *others = (str(c) for c in rng.permutation(list(COLORS))[:3])
    count = int(rng.integers(1, 5))
    for cell in canvas.free_cells(rng, count):
        canvas.cells[cell] = target
    for cell in canvas.free_cells(rng, int(rng.integers(1, 4))):
        canvas.cells[cell] = str(rng.choice(others))
    return TEMPLATES["counting"].format(c=target), NUMBERS[1:5], NUMBERS[count]


def _comparison(rng, canvas):
    a, b = (str(c) for c in rng.permutation(list(COLORS))[:2])
    n_a, n_b = (int(n) for n in rng.choice(np.arange(1, 6), size=2, replace=False))
    for color, n in ((a, n_a), (b, n_b)):
        for cell in canvas.free_cells(rng, n):
            canvas.cells[cell] = color
    first, second = sorted([a, b])  # the order in the question says nothing about the answer
    return TEMPLATES["comparison"].format(a=first, b=second), [first, second], \
        a if n_a > n_b else b


def _spatial(rng, canvas):
    a, b = (str(c) for c in rng.permutation(list(COLORS))[:2])
    direction = str(rng.choice(DIRECTIONS))
    g = canvas.grid
    while True:  # a cell pair in one clear direction: same row or same column
        r, c = (int(x) for x in rng.integers(0, g, size=2))
        shift = int(rng.integers(1, g))
        dr, dc = {"left": (0, shift), "right": (0, -shift), "above": (shift, 0),
                  "below": (-shift, 0)}[direction]
        if 0 <= r + dr < g and 0 <= c + dc < g:
            break
    canvas.cells[(r, c)] = a  # a is `direction` of b
    canvas.cells[(r + dr, c + dc)] = b
    return TEMPLATES["spatial"].format(a=a, b=b), list(DIRECTIONS), direction


def _odd_one_out(rng, canvas):
    colors = [str(c) for c in rng.permutation(list(COLORS))[:4]]
    odd = colors[0]
    canvas.cells[canvas.free_cells(rng, 1)[0]] = odd
    for color in colors[1:]:
        for cell in canvas.free_cells(rng, int(rng.integers(2, 4))):
            canvas.cells[cell] = color
    return TEMPLATES["odd_one_out"], sorted(colors), odd


def _pattern(rng, canvas):
    period = int(rng.integers(2, 4))
    cycle = [str(c) for c in rng.permutation(list(COLORS))[:period]]
    row = int(rng.integers(0, canvas.grid))
    hidden = int(rng.integers(period, canvas.grid))  # at least one full cycle is visible
    for c in range(canvas.grid):
        canvas.cells[(row, c)] = GREY if c == hidden else cycle[c % period]
    answer = cycle[hidden % period]
    others = [c for c in rng.permutation(list(COLORS)) if str(c) != answer][:3]
    return TEMPLATES["pattern"], sorted([answer, *(str(c) for c in others)]), answer


_FAMILY_FNS: dict[str, Callable] = {"counting": _counting, "comparison": _comparison,
                                    "spatial": _spatial, "odd_one_out": _odd_one_out,
                                    "pattern": _pattern}


def make_puzzle(family: str, split: str, index: int, seed: int = 0, grid: int = 4,
                cell: int = 8) -> dict:
    """One reproducible puzzle of ``family`` from (seed, split, index)."""
    if family not in _FAMILY_FNS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < MIN_GRID:
        raise ValueError(f"grid must be an int >= {MIN_GRID} (the odd-one-out family places "
                         f"up to 10 shapes, a pattern row needs its period + 1 cells), got "
                         f"{grid!r}")
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise ValueError(f"cell must be a positive int (pixels a side), got {cell!r}")
    family_index = FAMILIES.index(family)
    rng = np.random.default_rng([seed, SPLITS[split], family_index, index])
    canvas = PuzzleCanvas(grid, cell)
    question, choices, answer = _FAMILY_FNS[family](rng, canvas)
    return {"id": f"{family}-{split}-{index}", "family": family, "images": [canvas.render()],
            "question": _options(question, choices), "choices": choices, "answer": answer}


def puzzle_suite(split: str, per_family: int, seed: int = 0,
                 families: tuple[str, ...] = FAMILIES, **render) -> list[dict]:
    """``per_family`` puzzles of every family for one split, interleaved by family."""
    return [make_puzzle(f, split, i, seed, **render) for i in range(per_family) for f in families]


def vocabulary() -> list[str]:
    """Every word a puzzle question or answer can contain (for a word-level tokenizer)."""
    words = set(COLORS) | set(NUMBERS) | set(DIRECTIONS) | {"options", ":", ","}
    for template in TEMPLATES.values():
        words.update(w for w in template.split() if not w.startswith("{"))
    return sorted(words)
