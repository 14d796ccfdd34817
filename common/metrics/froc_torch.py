"""LUNA16 FROC/CPM as a torchmetrics ``Metric`` for validation loops (DDP-correct, cheap per epoch).

Every rank accumulates its scans' marks and findings in list states (``dist_reduce_fx="cat"``), so
``compute()`` sees the predictions of all ranks, and then runs the same numpy core as
``lungdata evaluate-froc`` (:func:`common.metrics.froc.evaluate_froc`). The FROC needs every
prediction at once (false positives per scan are pooled over the whole set), which is why it cannot
be reduced per batch.

``DistributedSampler`` pads the last batch by repeating scans, so the same scan can arrive twice
(from two ranks, or twice on one). Each submitted scan carries a token (rank and submission order)
and ``compute()`` keeps one submission per scan key, so padding never double-counts a scan.

Example::

    froc = LUNA16FROC()
    froc.update(
        scan_ids=[17],                                   # one int key per scan (dataset index)
        candidates=[torch.tensor([[x, y, z, p], ...])],  # world mm + probability
        nodules=[torch.tensor([[x, y, z, d], ...])],     # included nodules, diameter mm
        excluded=[torch.zeros(0, 4)],                    # optional excluded findings
    )
    froc.compute()  # {"cpm": ..., "sens@0.125": ..., ..., "sens@8": ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from common.metrics.froc import FP_RATES, MAX_MARKS_PER_SCAN, FROCResult, Reading, evaluate_froc
from common.metrics.unique_samples import TOKEN_RANK_SHIFT, first_per_key, process_rank, sample_key


def scan_key_from_uid(uid: str) -> int:
    """A stable non-negative 62-bit integer key for a series UID (same on every rank and run)."""
    return sample_key(uid)


def _rows(value: Any, width: int, what: str, index: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach()
    if t.numel() == 0:
        return t.reshape(0, width)
    if t.ndim != 2 or t.shape[1] != width:
        raise ValueError(
            f"{what}[{index}] must have shape (n, {width}) = x, y, z (world mm) and "
            f"{'probability' if what == 'candidates' else 'diameter_mm'}; got {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}[{index}] contains NaN or infinite values; check the model output / labels")
    return t


class LUNA16FROC(Metric):
    """FROC sensitivities at 1/8…8 FP/scan and CPM with the official LUNA16 rules.

    Args:
        fp_rates: FP rates to report (default the seven LUNA16 rates).
        reading: ``"interp"`` or ``"nearest"`` (see :func:`common.metrics.froc.read_sensitivities`).
        max_marks: per-scan cap on marks (official: 100); None disables it.
        n_bootstrap: bootstrap samples for CIs in :meth:`compute_result` (0: none; validation
            loops usually leave it off).
        seed: bootstrap seed.
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        fp_rates: Sequence[float] = FP_RATES,
        reading: Reading = "interp",
        max_marks: int | None = MAX_MARKS_PER_SCAN,
        n_bootstrap: int = 0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reading not in ("interp", "nearest"):
            raise ValueError(f"reading must be 'interp' or 'nearest', got {reading!r}")
        self.fp_rates = tuple(float(r) for r in fp_rates)
        self.reading = reading
        self.max_marks = max_marks
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self._submitted = 0
        self._last: FROCResult | None = None
        for name in ("scan_key", "scan_token", "cand_token", "cand_data", "nod_token", "nod_data"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        scan_ids: Sequence[int] | torch.Tensor,
        candidates: Sequence[Any],
        nodules: Sequence[Any],
        excluded: Sequence[Any] | None = None,
    ) -> None:
        """Add a batch of scans.

        Args:
            scan_ids: one integer key per scan, the same for the same scan on every rank (a
                dataset index, or :func:`scan_key_from_uid`).
            candidates: per scan, (n, 4) marks: x, y, z in world mm and the probability.
            nodules: per scan, (m, 4) included nodules: x, y, z in world mm and the diameter in mm.
            excluded: per scan, (k, 4) excluded findings (marks on them are ignored; negative
                diameter = 10 mm), or None.
        """
        keys = torch.as_tensor(scan_ids, dtype=torch.int64).reshape(-1).cpu()
        n = keys.shape[0]
        if len(candidates) != n or len(nodules) != n or (excluded is not None and len(excluded) != n):
            raise ValueError(
                f"got {n} scan ids but {len(candidates)} candidate sets and {len(nodules)} nodule sets"
                + ("" if excluded is None else f" and {len(excluded)} excluded sets")
                + "; pass one of each per scan"
            )
        base = (process_rank() << TOKEN_RANK_SHIFT) + self._submitted
        tokens = torch.arange(base, base + n, dtype=torch.int64)
        self._submitted += n
        cand_rows, cand_tok, nod_rows, nod_tok = [], [], [], []
        for i in range(n):
            c = _rows(candidates[i], 4, "candidates", i)
            cand_rows.append(c)
            cand_tok.append(torch.full((c.shape[0],), int(tokens[i]), dtype=torch.int64, device=c.device))
            parts = [(_rows(nodules[i], 4, "nodules", i), 1.0)]
            if excluded is not None:
                parts.append((_rows(excluded[i], 4, "excluded", i), 0.0))
            for rows, flag in parts:
                nod_rows.append(
                    torch.cat(
                        (rows, torch.full((rows.shape[0], 1), flag, dtype=torch.float64, device=rows.device)),
                        1,
                    )
                )
                nod_tok.append(
                    torch.full((rows.shape[0],), int(tokens[i]), dtype=torch.int64, device=rows.device)
                )
        device = self.device
        self.scan_key.append(keys.to(device))
        self.scan_token.append(tokens.to(device))
        self.cand_token.append(torch.cat(cand_tok).to(device))
        self.cand_data.append(torch.cat(cand_rows).to(device))
        self.nod_token.append(torch.cat(nod_tok).to(device))
        self.nod_data.append(torch.cat(nod_rows).to(device))

    def _gathered(self) -> dict[str, np.ndarray]:
        def cat(state: Any, width: int | None, dtype: torch.dtype) -> np.ndarray:
            if isinstance(state, list) and not state:
                shape = (0,) if width is None else (0, width)
                return np.zeros(shape, dtype=np.int64 if dtype == torch.int64 else np.float64)
            t = dim_zero_cat(state).to(dtype)
            if width is not None:
                t = t.reshape(-1, width)
            return t.cpu().numpy()

        return {
            "scan_key": cat(self.scan_key, None, torch.int64),
            "scan_token": cat(self.scan_token, None, torch.int64),
            "cand_token": cat(self.cand_token, None, torch.int64),
            "cand_data": cat(self.cand_data, 4, torch.float64),
            "nod_token": cat(self.nod_token, None, torch.int64),
            "nod_data": cat(self.nod_data, 5, torch.float64),
        }

    def compute_result(self) -> FROCResult:
        """The full :class:`~common.metrics.froc.FROCResult` (curve, counts, bootstrap) of all ranks.

        Goes through :meth:`compute` so that the states are gathered across ranks first.
        """
        self.compute()
        assert self._last is not None
        return self._last

    def _evaluate(self) -> FROCResult:
        """Run the numpy core on the (already gathered) states."""
        s = self._gathered()
        keys, tokens = s["scan_key"], s["scan_token"]
        # One submission per scan: the smallest token wins (duplicates come from sampler padding).
        kept_tokens = tokens[first_per_key(keys, tokens)]  # scan i of the evaluation = kept_tokens[i]
        by_token = np.argsort(kept_tokens)
        kept_sorted = kept_tokens[by_token]

        def scan_index(tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Rows whose submission was kept, and their scan index."""
            if kept_sorted.size == 0:
                return np.zeros(tok.shape[0], dtype=bool), np.zeros(0, dtype=np.int64)
            loc = np.minimum(np.searchsorted(kept_sorted, tok), kept_sorted.size - 1)
            mask = kept_sorted[loc] == tok
            return mask, by_token[loc[mask]]

        c_mask, c_scan = scan_index(s["cand_token"])
        n_mask, n_scan = scan_index(s["nod_token"])
        cand = s["cand_data"][c_mask]
        nod = s["nod_data"][n_mask]
        return evaluate_froc(
            c_scan,
            cand[:, :3],
            cand[:, 3],
            n_scan,
            nod[:, :3],
            nod[:, 3],
            nod[:, 4] > 0.5,
            n_scans=int(kept_tokens.shape[0]),
            reading=self.reading,
            n_bootstrap=self.n_bootstrap,
            seed=self.seed,
            bootstrap_grid=None,
            max_marks=self.max_marks,
            fp_rates=self.fp_rates,
        )

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"cpm": ..., "sens@<rate>": ...}`` as float tensors (NaN when no nodule was seen)."""
        result = self._last = self._evaluate()
        out = {"cpm": torch.tensor(result.cpm, dtype=torch.float32)}
        for rate, sens in zip(result.fp_rates, result.sensitivities):
            out[f"sens@{rate:g}"] = torch.tensor(float(sens), dtype=torch.float32)
        return out
