"""Class names and labels: the sorted class map of folder sources, names made unique, labels
from relative paths, and the check that training and validation shards name the same classes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath


def sorted_class_map(names: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Sorted class folder names (one per folder, however often each is given) and the name -> label
    mapping they define. Only for names that are identities, such as folders; never for dataset
    display names, where two classes can share a name."""
    classes = sorted(set(names))
    return classes, {name: i for i, name in enumerate(classes)}


def unique_class_names(names: Sequence[str]) -> list[str]:
    """A dataset's class names in its label order (label i -> entry i), made unique for index.json.

    Different classes can share a display name (ImageNet's two "crane" synsets, say); the label
    ids are the identity, so nothing is merged or reordered: a repeated name gets " (2)", " (3)",
    ... in order of appearance, skipping any suffixed name the dataset already uses.
    """
    taken = set(names)
    seen: set[str] = set()
    unique = []
    for name in names:
        if name in seen:
            n = 2
            while f"{name} ({n})" in taken:
                n += 1
            name = f"{name} ({n})"
            taken.add(name)
        seen.add(name)
        unique.append(name)
    return unique


def _listed(names: list[str], most: int = 5) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def check_same_classes(train: list[str] | None, val: list[str] | None, train_where: str, val_where: str) -> None:
    """Raise a one-line ValueError when a validation split's classes (its index.json `classes`)
    are not training's, in the same order: a label means a class only if both agree.

    None is an unlabeled split; two unlabeled splits agree. `train_where`/`val_where` name the
    splits in the message (e.g. "eval.shards: data/val").
    """
    if train == val:
        return
    if val is None or train is None:
        unlabeled, labeled, classes = (val_where, train_where, train) if val is None else (train_where, val_where, val)
        raise ValueError(f"{unlabeled} has no labels (index classes is null), {labeled} has {len(classes)} classes")
    train_set, val_set = set(train), set(val)
    missing = [c for c in train if c not in val_set]
    extra = [c for c in val if c not in train_set]
    if missing or extra or len(train) != len(val):
        detail = "; ".join(f"{kind}: {_listed(names)}" for kind, names in (("missing", missing), ("extra", extra))
                           if names)
        raise ValueError(f"{val_where} has {len(val)} classes, {train_where} has {len(train)}"
                         + (f" ({detail})" if detail else ""))
    i = next(i for i, (v, t) in enumerate(zip(val, train)) if v != t)
    raise ValueError(f"{val_where} and {train_where}: classes differ in order at label {i} (val {val[i]!r}, "
                     f"train {train[i]!r}): write both splits from one source so labels agree")


def label_relpaths(relpaths: Sequence[str], labeled: bool | None) -> tuple[list[str] | None, list[int | None]]:
    """Classes and per-image labels from `class/file` relative paths.

    `labeled=None` decides from the layout: labeled when every image sits exactly one folder
    deep (one subfolder per class), otherwise an unlabeled, arbitrarily nested collection.
    """
    depths = {len(PurePosixPath(p).parts) for p in relpaths}
    if labeled is None:
        labeled = depths == {2}
    if not labeled:
        return None, [None] * len(relpaths)
    if depths != {2}:
        raise ValueError("a labeled image folder needs every image directly inside one class folder")
    classes, index = sorted_class_map(PurePosixPath(p).parts[0] for p in relpaths)
    return classes, [index[PurePosixPath(p).parts[0]] for p in relpaths]
