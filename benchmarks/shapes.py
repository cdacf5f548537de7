"""The only place benchmark shapes live.

A :class:`Shape` is ``T`` rows of width ``K`` multiplied by ``G`` weight groups of ``(N, K)``, with the rows split
among the groups by a named rule (:data:`SPLITS`). Sets:

* :data:`GPU` - the full GPU set: T in {4096, 16384, 65536}, K = N in {2048, 4096}, G in {2, 3, 4} balanced and
  80/20, plus G = 64 balanced and Zipf-skewed;
* :data:`GPU_QUICK` - a handful of those, for a fast GPU run;
* :data:`CPU` and :data:`CPU_QUICK` - tiny shapes that run in seconds on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


def _balanced(T: int, G: int) -> list[int]:
    """Equal shares; the first ``T % G`` groups get one row more."""
    return [T // G + (g < T % G) for g in range(G)]


def _eighty_twenty(T: int, G: int) -> list[int]:
    """Group 0 takes 80% of the rows; the other ``G - 1`` groups share the remaining 20% equally."""
    first = round(0.8 * T)
    return [first] + _balanced(T - first, G - 1)


def _zipf(T: int, G: int) -> list[int]:
    """Group ``g`` gets rows in proportion to ``1 / (g + 1)`` (Zipf, s = 1); rounding leftovers go to group 0.

    For G = 64 group 0 holds ~21% of the rows and the last groups ~0.3% each.
    """
    weights = [1.0 / (g + 1) for g in range(G)]
    total = sum(weights)
    counts = [int(T * w / total) for w in weights]
    counts[0] += T - sum(counts)
    return counts


SPLITS = {"balanced": _balanced, "80/20": _eighty_twenty, "zipf": _zipf}


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: ``out (T, N) = x (T, K) @ W_g^T`` with rows split among G groups by ``split``."""

    T: int
    K: int
    N: int
    G: int
    split: str

    @property
    def counts(self) -> list[int]:
        """Rows per group (sums to ``T``)."""
        return SPLITS[self.split](self.T, self.G)

    def label(self) -> str:
        return f"T{self.T} K{self.K} N{self.N} G{self.G} {self.split}"


def _grid(Ts, KNs, Gs_splits) -> list[Shape]:
    return [Shape(T, kn, kn, G, split) for T in Ts for kn in KNs for G, split in Gs_splits]


_FEW_GROUPS = [(G, s) for G in (2, 3, 4) for s in ("balanced", "80/20")]
_MANY_GROUPS = [(64, "balanced"), (64, "zipf")]

GPU_QUICK: list[Shape] = [
    Shape(16384, 4096, 4096, 2, "balanced"),
    Shape(16384, 4096, 4096, 2, "80/20"),
    Shape(65536, 4096, 4096, 3, "80/20"),
    Shape(65536, 2048, 2048, 4, "balanced"),
    Shape(65536, 4096, 4096, 64, "zipf"),
]

# The quick shapes run first, so a run stopped by its time budget still holds them (tables sort rows by shape).
GPU: list[Shape] = GPU_QUICK + [
    s for s in _grid((4096, 16384, 65536), (2048, 4096), _FEW_GROUPS + _MANY_GROUPS) if s not in GPU_QUICK
]

CPU: list[Shape] = [
    Shape(256, 128, 128, 2, "balanced"),
    Shape(1024, 256, 256, 2, "80/20"),
    Shape(1024, 256, 256, 3, "balanced"),
    Shape(1024, 256, 256, 4, "80/20"),
    Shape(1024, 256, 256, 64, "balanced"),
    Shape(1024, 256, 256, 64, "zipf"),
]

# Zipf with 64 groups over 256 rows leaves the tail groups with one row or none: the empty-group path runs too.
CPU_QUICK: list[Shape] = [Shape(256, 128, 128, 2, "80/20"), Shape(256, 128, 128, 64, "zipf")]


def shapes_for(device: str, quick: bool) -> list[Shape]:
    """The shape set for a device type (``"cuda"`` or ``"cpu"``)."""
    if device == "cuda":
        return GPU_QUICK if quick else GPU
    return CPU_QUICK if quick else CPU
