"""What a batch job reports: one :class:`FileResult` per input, gathered in a
:class:`BatchReport` (segment) or a :class:`FitReport` (fit)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


@dataclass
class FileResult:
    """What happened to one input.

    ``status`` is one of ``"written"`` (segmented now), ``"existing"`` (a finished output
    was already there and was kept), ``"skipped"`` (nothing to segment: all-NaN or
    constant), ``"failed"`` (``message`` says why), or for ``fit`` ``"used"``.
    """

    input: str
    status: str
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    planes: int = 0
    pixels: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        """One line for a terminal: ``<input>: <message>``."""
        return f"{self.input}: {self.message}" if self.message else self.input


@dataclass
class BatchReport:
    """The outcome of :func:`segment_files`: one :class:`FileResult` per input."""

    results: list[FileResult]
    out: str
    seconds: float = 0.0
    workers: list[str] = field(default_factory=list)

    def _count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def written(self) -> int:
        return self._count("written")

    @property
    def existing(self) -> int:
        return self._count("existing")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def ok(self) -> bool:
        """True when every input has its finished output."""
        return self.failed == 0 and self.skipped == 0

    @property
    def exit_code(self) -> int:
        """0: every input has its output; 1: some inputs failed or were skipped."""
        return 0 if self.ok else 1

    @property
    def problems(self) -> list[FileResult]:
        return [r for r in self.results if r.status in ("failed", "skipped")]

    def summary(self) -> str:
        planes = sum(r.planes for r in self.results if r.status == "written")
        mpx = sum(r.pixels for r in self.results if r.status == "written") / 1e6
        rate = f", {mpx / self.seconds:.3g} Mpx/s" if self.seconds > 0 and mpx else ""
        return (f"{len(self.results)} inputs: {self.written} written, {self.existing} already "
                f"done, {self.skipped} skipped, {self.failed} failed ({planes} planes, "
                f"{mpx:.3g} Mpx in {self.seconds:.1f} s{rate}) -> {self.out}")

    def __repr__(self) -> str:
        return f"BatchReport({self.summary()})"


@dataclass
class FitReport:
    """The outcome of :func:`fit_files`: the model file and what each input gave."""

    model: str
    results: list[FileResult]
    n_images: int
    warnings: list[str] = field(default_factory=list)  # the fit's (model.info["warnings"])

    @property
    def exit_code(self) -> int:
        return 0 if all(r.status == "used" for r in self.results) else 1

    @property
    def problems(self) -> list[FileResult]:
        return [r for r in self.results if r.status != "used"]
