"""Evaluation metrics that count every sample exactly once under DDP, for any number of ranks.

Lightning gives evaluation loaders a ``DistributedSampler``, which pads the index list by repeating its
first entries until every rank has the same number of samples (and so the same number of batches): 3
validation images on 2 ranks are scored as 4, 5 scans on 4 ranks as 8. A torchmetrics state gathered
with ``"cat"`` then holds the padded samples twice, and a metric computed from it differs from the
single-process value.

The metrics here store one row per sample together with

- a *key* that names the sample the same way on every rank — a dataset index, or :func:`sample_key` of
  a case id such as a series UID and a nodule label — and
- a *token* (rank, order of submission) that tells copies apart,

and ``compute()`` keeps the earliest submission of each key (:func:`first_per_key`). This is the
mechanism :class:`common.metrics.froc_torch.LUNA16FROC` uses for whole scans; the functions are shared so
that both agree on what "earliest" means.

States are flat 1-D tensors of fixed dtypes, and every list state holds a zero-length tensor of its dtype
from the start: torchmetrics replaces an empty list state by a ``float32`` tensor before gathering, which
would not match the ``int64`` keys of a rank that did see samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

TOKEN_RANK_SHIFT = 40
"""Submission tokens are ``(rank << 40) + order``: unique across ranks for up to 2**40 rows per rank."""


def process_rank() -> int:
    """Rank of this process in the default process group (0 without ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def sample_key(*parts: object) -> int:
    """A stable non-negative 62-bit integer key for a case id made of ``parts`` (same on every rank and run).

    ``sample_key(uid)`` equals :func:`common.metrics.froc_torch.scan_key_from_uid`; ``sample_key(uid, 3)``
    names nodule 3 of that scan. Parts are joined with a unit separator, so ``("a", "bc")`` and
    ``("ab", "c")`` differ.
    """
    if not parts:
        raise ValueError("sample_key needs at least one part (a case id)")
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def first_per_key(keys: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Row numbers of the earliest submission (smallest token) of every distinct key, in key order.

    Args:
        keys: (n,) sample keys; a key repeats when a sampler padded the sample in.
        tokens: (n,) submission tokens, unique per row.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if keys.shape != tokens.shape:
        raise ValueError(f"{keys.shape[0]} keys but {tokens.shape[0]} tokens; pass one token per key")
    order = np.lexsort((tokens, keys))
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    return order[first]


class UniqueSampleMetric(Metric):
    """Base of metrics computed from one row of ``width`` numbers per sample, each sample counted once.

    Subclasses call :meth:`_add` in ``update`` and :meth:`unique_samples` in ``compute`` (where
    torchmetrics has already gathered the states of all ranks).

    Args:
        width: numbers per sample row.
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    full_state_update = False
    _STATE_DTYPES = {"sample_key": torch.int64, "sample_token": torch.int64, "sample_rows": torch.float64}

    def __init__(self, width: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if width < 1:
            raise ValueError(f"width must be >= 1 numbers per sample, got {width}")
        self.width = int(width)
        self._submitted = 0
        for name in self._STATE_DTYPES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self._seed_states()

    def _seed_states(self) -> None:
        """Put a zero-length tensor of the state's dtype into every empty list state (module docstring)."""
        for name, dtype in self._STATE_DTYPES.items():
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                state.append(torch.zeros(0, dtype=dtype, device=self.device))

    def reset(self) -> None:
        """Clear the states (and re-seed them with typed empty tensors)."""
        super().reset()
        self._seed_states()

    def _add(self, keys: Sequence[int] | torch.Tensor | None, rows: Any) -> None:
        """Store ``rows`` (n, width), one per sample; ``keys`` None means every row is a distinct sample.

        Raises:
            ValueError: negative keys, or a number of keys that does not match the rows.
        """
        values = torch.as_tensor(rows, dtype=torch.float64).detach()
        if values.ndim == 1 and self.width == 1:
            values = values.reshape(-1, 1)
        if values.ndim != 2 or values.shape[1] != self.width:
            raise ValueError(f"expected (n, {self.width}) sample rows, got shape {tuple(values.shape)}")
        n = values.shape[0]
        base = (process_rank() << TOKEN_RANK_SHIFT) + self._submitted
        tokens = torch.arange(base, base + n, dtype=torch.int64)
        self._submitted += n
        if keys is None:
            key = -1 - tokens  # negative: never equal to a real key, never equal to each other
        else:
            key = torch.as_tensor(keys, dtype=torch.int64).detach().reshape(-1).cpu()
            if key.shape[0] != n:
                raise ValueError(f"got {key.shape[0]} sample keys for {n} samples; pass one key per sample")
            if key.numel() and int(key.min()) < 0:
                raise ValueError("sample keys must be >= 0 (dataset indices or sample_key(...) values)")
        device = self.device
        self.sample_key.append(key.to(device))
        self.sample_token.append(tokens.to(device))
        self.sample_rows.append(values.reshape(-1).to(device))

    def unique_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys (m,), rows (m, width)) of the distinct samples, in key order (earliest submission kept).

        Reads the states as they are: inside ``compute`` these are the states of all ranks.
        """
        keys = dim_zero_cat(self.sample_key).to(torch.int64).cpu().numpy()
        tokens = dim_zero_cat(self.sample_token).to(torch.int64).cpu().numpy()
        rows = dim_zero_cat(self.sample_rows).to(torch.float64).cpu().numpy().reshape(-1, self.width)
        if not (keys.shape[0] == tokens.shape[0] == rows.shape[0]):
            raise RuntimeError(
                f"{type(self).__name__}: {keys.shape[0]} keys, {tokens.shape[0]} tokens and {rows.shape[0]} "
                "rows after gathering; every rank must update the same metric the same way"
            )
        kept = first_per_key(keys, tokens)
        return keys[kept], rows[kept]


class UniqueSampleMean(UniqueSampleMetric):
    """Per-sample values summed over the distinct samples and divided by their summed weights.

    With ``reduction="none"`` losses and, as weights, the class weight of each target (1 without class
    weights), the result is exactly PyTorch's weighted ``"mean"`` loss over the whole evaluation set —
    unlike the mean of per-batch (or per-rank) means, which weighs a sample by its batch size and
    counts padded samples twice.

    Args:
        names: one output per name; ``update`` takes a (B,) tensor per name.
        kwargs: torchmetrics ``Metric`` options.
    """

    higher_is_better = False

    def __init__(self, names: Sequence[str] = ("value",), **kwargs: Any) -> None:
        names = tuple(str(n) for n in names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct and non-empty, got {names}")
        super().__init__(width=len(names) + 1, **kwargs)
        self.names = names

    def update(
        self,
        keys: Sequence[int] | torch.Tensor | None,
        values: dict[str, torch.Tensor] | torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            keys: (B,) sample keys (dataset indices), or None (no de-duplication).
            values: ``{name: (B,)}`` for every name, or a (B,) tensor when there is one name.
            weights: (B,) denominators per sample (default 1).
        """
        if isinstance(values, dict):
            missing = [n for n in self.names if n not in values]
            if missing:
                raise ValueError(f"values lack {missing}; give one (B,) tensor per name of {self.names}")
            columns = [torch.as_tensor(values[n]).detach().reshape(-1) for n in self.names]
        else:
            if len(self.names) != 1:
                raise ValueError(f"pass a dict of (B,) tensors for the names {self.names}")
            columns = [torch.as_tensor(values).detach().reshape(-1)]
        n = columns[0].shape[0]
        w = torch.ones(n) if weights is None else torch.as_tensor(weights).detach().reshape(-1)
        if any(c.shape[0] != n for c in columns) or w.shape[0] != n:
            raise ValueError(
                f"values and weights must all have one entry per sample; got "
                f"{[c.shape[0] for c in columns]} values and {w.shape[0]} weights"
            )
        rows = torch.stack([c.to(torch.float64).cpu() for c in columns] + [w.to(torch.float64).cpu()], 1)
        self._add(keys, rows)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{name: Σ value / Σ weight}`` over the distinct samples (NaN when there are none)."""
        _, rows = self.unique_samples()
        total = float(rows[:, -1].sum())
        return {
            name: torch.tensor(float(rows[:, j].sum()) / total if total > 0 else float("nan"))
            for j, name in enumerate(self.names)
        }
