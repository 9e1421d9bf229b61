"""Connected groups of items that must stay together: a patient's images, near-duplicate scans.

``linked`` is the one union-find that training.prepare's split and training.evaluate's bootstrap
units share.
"""
from __future__ import annotations

from typing import Hashable, Iterable, TypeVar

T = TypeVar("T", bound=Hashable)


def linked(items: Iterable[T], links: Iterable[Iterable[T]]) -> dict[T, T]:
    """Each item -> the smallest item of its group, where every link (a collection of items) puts
    its members in one group; a link's members that are not among ``items`` are ignored."""
    parent = {x: x for x in items}

    def find(x: T) -> T:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for link in links:
        roots = sorted({find(x) for x in link if x in parent})
        for r in roots[1:]:  # the smallest root stays: a root is always its group's smallest item
            parent[r] = roots[0]
    return {x: find(x) for x in parent}
