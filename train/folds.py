"""Five-fold cross-validation split of one site's cases, deterministic from their names.

Every site splits its own cases (no case list ever leaves a site): the names are sorted, and
case ``i`` of the sorted list validates fold ``i mod k``. Every fold thus holds out about a
fifth of every site's cases, the five validation sets are disjoint and cover all cases, and
adding a case at the end of the order moves no other case. A site with fewer than ``k``
cases still validates every fold on one case, case ``fold mod n``, so that no fold of a small
site goes unvalidated (its validation sets then overlap).
"""

from __future__ import annotations


def split_cases(names: list[str], fold: int, num_folds: int = 5) -> tuple[list[str], list[str]]:
    """``(training, validation)`` case names of ``fold`` in ``0..num_folds-1``, both sorted."""
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold {fold} is not in 0..{num_folds - 1}")
    ordered = sorted(names)
    if len(set(ordered)) != len(ordered):
        duplicates = sorted({n for n in ordered if ordered.count(n) > 1})
        raise ValueError(f"duplicate case names: {duplicates}")
    if len(ordered) < 2:
        raise ValueError(f"{len(ordered)} case(s): a site needs at least 2 to train and validate")
    if len(ordered) >= num_folds:
        held_out = {i for i in range(len(ordered)) if i % num_folds == fold}
    else:
        held_out = {fold % len(ordered)}
    training = [name for i, name in enumerate(ordered) if i not in held_out]
    validation = [name for i, name in enumerate(ordered) if i in held_out]
    return training, validation
