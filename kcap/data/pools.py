"""The value pools of the biographies: names, cities, universities, majors, employers.

The lists are the project's own plain-text files in ``pools/``; their sizes are the paper's
(spec section 2) and are checked when loaded, so a damaged file fails loudly instead of
silently changing the number of bits in the data.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

POOL_SIZES = {
    "first_names": 400,
    "middle_names": 400,
    "last_names": 1000,
    "birth_cities": 200,
    "universities": 300,
    "majors": 100,
    "employers": 263,
}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
DAYS = 28  # the paper's 12 x 28 x 200 birth dates
FIRST_YEAR, YEARS = 1900, 200
N_BIRTH_DATES = len(MONTHS) * DAYS * YEARS  # 67,200
N_FULL_NAMES = 400 * 400 * 1000  # N0 = 1.6e8


@dataclass(frozen=True)
class Pools:
    first_names: tuple[str, ...]
    middle_names: tuple[str, ...]
    last_names: tuple[str, ...]
    birth_cities: tuple[str, ...]
    universities: tuple[str, ...]
    majors: tuple[str, ...]
    employers: tuple[str, ...]
    employer_cities: tuple[str, ...]  # headquarters of employers[i]: the working city

    def full_name(self, name_id: int) -> str:
        """Full name of a name id in [0, N0): first-major, then middle, then last."""
        first, rest = divmod(int(name_id), 400 * 1000)
        middle, last = divmod(rest, 1000)
        return f"{self.first_names[first]} {self.middle_names[middle]} {self.last_names[last]}"


def split_name_id(name_id):
    """(first, middle, last) pool indices of name ids (ints or numpy arrays)."""
    first, rest = divmod(name_id, 400 * 1000)
    middle, last = divmod(rest, 1000)
    return first, middle, last


def birth_date_text(index: int) -> str:
    """Text of birth date ``index`` in [0, 67200): month-major, then day, then year."""
    month, rest = divmod(int(index), DAYS * YEARS)
    day, year = divmod(rest, YEARS)
    return f"{MONTHS[month]} {day + 1}, {FIRST_YEAR + year}"


def _read_lines(name: str) -> list[str]:
    text = resources.files("kcap.data").joinpath("pools").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


@functools.lru_cache(maxsize=1)
def load_pools() -> Pools:
    """Read and check the pool files (cached)."""
    lists = {key: _read_lines(f"{key}.txt") for key in POOL_SIZES if key != "employers"}
    rows = [line.split("\t") for line in _read_lines("employers.tsv")]
    if any(len(r) != 2 for r in rows):
        raise ValueError("pools/employers.tsv: every line must be 'Company<TAB>City, ST'")
    lists["employers"] = [r[0] for r in rows]
    for key, size in POOL_SIZES.items():
        values = lists[key]
        if len(values) != size or len(set(values)) != size:
            raise ValueError(f"pool {key}: expected {size} distinct entries, "
                             f"found {len(values)} ({len(set(values))} distinct)")
    return Pools(**{k: tuple(v) for k, v in lists.items()},
                 employer_cities=tuple(r[1] for r in rows))
