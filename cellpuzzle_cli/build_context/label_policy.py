"""One policy for cell-type labels, applied where they enter (build-context).

A cell type is the answer of its puzzles, so a label must be one an answer can name and `score`
can match. Applied to the cell type column of every input file, in this order:

1. **Renames** (`--rename OLD=NEW`, repeatable; `--label-map FILE.tsv` with one `OLD<TAB>NEW`
   line per label) are matched against the tidied label (step 2). An empty NEW means the cells
   have no cell type: they are dropped like cells whose type is missing.
2. **Tidy**: Unicode NFC (one spelling of "naïve"), invisible format characters (zero-width
   space, byte-order mark, soft hyphen) removed, white space trimmed and inner runs made one
   space. Labels that become equal are one type (with a warning).
3. **Refuse** (naming the label, the column and the fix): an empty label; a spelling of a
   missing value (nan, none, null, na, n/a, <na>); a line break inside; `|`, which separates an
   answer's types; the answer's tags (`<think>`, `</think>`, `<answer>`, `</answer>`); a leading
   list bullet (`-`, `*`, `•`) or `Cell <i>:`, which the reader of puzzle text takes as syntax.
4. **Case**: labels that differ only in case are one type, across all files of the run, since
   answers are compared ignoring case and `score` could never tell them apart. The spelling with
   the most cells is kept (ties: the one met first, in input file order), with a warning naming
   both; a rename picks another.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cellpuzzle_cli.build_context.h5ad import Coded
from cellpuzzle_cli.errors import UserError

MISSING_SPELLINGS = frozenset({"nan", "none", "null", "na", "n/a", "<na>"})
ANSWER_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_CELL_LINE = re.compile(r"^cell\s+\d+\s*:", re.IGNORECASE)
_BULLETS = ("-", "*", "•")
_EXAMPLES = 3


def _clean(label: str) -> str:
    """NFC, format characters (Unicode category Cf) removed, outer white space trimmed."""
    label = unicodedata.normalize("NFC", label)
    return "".join(ch for ch in label if unicodedata.category(ch) != "Cf").strip()


def tidy(label: str) -> str:
    """The label as the policy reads it: `_clean`, inner runs of white space one space."""
    return " ".join(_clean(label).split())


def problem(label: str) -> str | None:
    """Why a (cleaned, not yet collapsed) label cannot be an answer, or None."""
    if len(label.splitlines()) > 1:
        return "holds a line break, which ends an answer's line"
    label = " ".join(label.split())
    if not label:
        return "is empty, so no answer can name it"
    if label.lower() in MISSING_SPELLINGS:
        return "is a spelling of a missing value, not a cell type"
    if "|" in label:
        return "holds '|', which separates the types in an answer"
    tag = next((t for t in ANSWER_TAGS if t in label), None)
    if tag:
        return f"holds '{tag}', a tag of the answer's layout"
    if label.startswith(_BULLETS) or _CELL_LINE.match(label):
        return "starts like list or 'Cell 1:' syntax of the puzzle text, which readers strip"
    return None


def load_renames(rename: list[str], label_map: Path | None) -> dict[str, str]:
    """{tidied OLD: tidied NEW} from `--rename OLD=NEW` options and a `--label-map` TSV."""
    pairs: list[tuple[str, str, str]] = []
    for item in rename:              # each holds '=' (ContextSettings.validate)
        old, _, new = item.partition("=")
        pairs.append((old, new, f"--rename '{item}'"))
    if label_map is not None:
        from cellpuzzle_cli.io import read_text

        for number, line in enumerate(read_text(label_map, "label map").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            old, sep, new = line.partition("\t")
            if not sep:
                raise UserError(f"Line {number} of the label map {label_map} has no tab: "
                                f"{line!r}. Write one 'OLD<TAB>NEW' pair per line.")
            pairs.append((old, new, f"line {number} of {label_map}"))
    renames: dict[str, str] = {}
    for old, new, where in pairs:
        key, value = tidy(old), tidy(new)
        if value and (why := problem(_clean(new))):
            raise UserError(f"The new name {new!r} ({where}) {why}. Choose another name.")
        if renames.setdefault(key, value) != value:
            raise UserError(f"The label {key!r} is renamed twice, to {renames[key]!r} and "
                            f"{value!r} ({where}). Keep one.")
    return renames


def recode(coded: Coded, label: Callable[[str], str | None]) -> Coded:
    """`coded` with each category replaced by `label(category)` (None: no cell type); equal
    results share one category, and categories no cell uses are left out."""
    codes, cats = coded
    used = np.bincount(codes[codes >= 0], minlength=cats.size) > 0
    new_cats: dict[str, int] = {}
    lookup = np.full(cats.size, -1, dtype=np.int32)
    for i in np.flatnonzero(used):
        new = label(str(cats[i]))
        if new is not None:
            lookup[i] = new_cats.setdefault(new, len(new_cats))
    new_codes = np.where(codes >= 0, lookup[np.maximum(codes, 0)], -1).astype(np.int32)
    return new_codes, np.asarray(list(new_cats), dtype=object)


def apply_label_policy(coded: Coded, renames: dict[str, str], column: str, path: Path,
                       used_renames: set[str]) -> tuple[Coded, list[str]]:
    """Steps 1-3 of the policy on one file's cell types: (recoded, warnings). Adds the rename
    keys that matched to `used_renames`."""
    codes, cats = coded
    counts = np.bincount(codes[codes >= 0], minlength=cats.size)
    cells = {str(c): int(n) for c, n in zip(cats, counts)}
    refused: list[tuple[str, str, int]] = []
    changed: dict[str, list[str]] = {}

    def label(raw: str) -> str | None:
        key = tidy(raw)
        if key in renames:
            used_renames.add(key)
            return renames[key] or None
        why = problem(_clean(raw))
        if why:
            refused.append((raw, why, cells[raw]))
            return None
        if key != raw:
            changed.setdefault(key, []).append(raw)
        return key

    result = recode(coded, label)
    if refused:
        raise UserError(_refusal(refused, column, path))
    notes = []
    if changed:
        shown = [f"{', '.join(repr(r) for r in raws)} → {key!r}"
                 for key, raws in list(changed.items())[:_EXAMPLES]]
        more = f" and {len(changed) - _EXAMPLES} more" if len(changed) > _EXAMPLES else ""
        notes.append(f"{sum(map(len, changed.values()))} cell type label(s) in obs column "
                     f"'{column}' were tidied (Unicode NFC, white space; labels that became "
                     f"equal are one type): {'; '.join(shown)}{more}.")
    return result, notes


def _refusal(refused: list[tuple[str, str, int]], column: str, path: Path) -> str:
    raw, why, cells = refused[0]
    key = tidy(raw)
    drop = key.lower() in MISSING_SPELLINGS or not key
    fix = (f"--rename '{key}=' drops those cells (as cells without a cell type), or "
           f"--rename '{key}=NEW NAME' names them" if drop
           else f"--rename '{key}=NEW NAME' renames it (an empty NEW drops those cells)")
    others = ""
    if len(refused) > 1:
        listed = ", ".join(repr(r) for r, _, _ in refused[1:1 + _EXAMPLES])
        others = f" {len(refused) - 1} other label(s) are refused too: {listed}."
    return (f"{path}: the cell type {raw!r} ({cells} cells) in obs column '{column}' {why}. "
            f"{fix}; --rename is repeatable, and --label-map FILE.tsv takes one 'OLD<TAB>NEW' "
            f"line per label (OLD as written here, white space tidied).{others}")


def merge_case_variants(columns: list[Coded]) -> tuple[list[Coded], list[list[str]]]:
    """Step 4 over all files: labels equal ignoring case become the most common spelling.
    Returns the recoded columns and, per column, warnings for the spellings it gave up."""
    cells: Counter[str] = Counter()
    for codes, cats in columns:
        counts = np.bincount(codes[codes >= 0], minlength=cats.size)
        cells.update({str(c): int(n) for c, n in zip(cats, counts) if n})
    first_seen = {label: i for i, label in enumerate(cells)}    # file order, then category order
    spellings: dict[str, list[str]] = {}
    for label in cells:
        spellings.setdefault(label.lower(), []).append(label)
    canonical = {s: min(group, key=lambda x: (-cells[x], first_seen[x]))
                 for group in spellings.values() if len(group) > 1 for s in group}
    out, notes = [], []
    for coded in columns:
        present = {str(c) for c in coded[1]} & set(canonical)
        out.append(recode(coded, lambda c: canonical.get(c, c)) if present else coded)
        notes.append([f"the cell type {s!r} ({cells[s]} cells in this run) was read as "
                      f"{canonical[s]!r} ({cells[canonical[s]]} cells): labels that differ only "
                      "in case are one type, as answers are compared ignoring case. Pass "
                      f"--rename '{canonical[s]}={s}' to keep the other spelling."
                      for s in sorted(present) if canonical[s] != s])
    return out, notes
