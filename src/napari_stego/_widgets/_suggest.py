"""The *Suggest number of clusters* dock widget: score a range of K on the model's codes.

Runs :func:`napari_stego.choose_k.suggest_for_model` on the chosen Image layers in the
background and plots each K's Calinski-Harabasz index (scaled to its maximum), cosine
silhouette and stability (matplotlib, embedded), with the suggested K marked, or says plainly
that the scores give no clear K. Refit with that K in *Fit STEGO*.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, PushButton, SpinBox

from ..errors import StegoError
from ._common import (
    SharedModelMixin,
    finish_layout,
    insert_after,
    model_store,
    notify_error,
    run_buttons,
    text,
    warm_imports,
)
from ._layers import LayerPicker
from ._plots import style_axes

if TYPE_CHECKING:
    import napari

    from ..choose_k import KScores

ALL_SLICES = "all slices"
CURRENT_SLICE = "shown slice only"
_STAGES = {"codes": "computing codes (images)", "score": "k-means runs per K"}


class _Images:
    """The 2D images of the chosen sources, read one at a time in the worker thread;
    ``len`` is their number (for the progress bar)."""

    def __init__(self, plan: list) -> None:
        self.plan = plan  # [(source, [stack indices])]

    def __len__(self) -> int:
        return sum(len(indices) for _, indices in self.plan)

    def __iter__(self):
        for src, indices in self.plan:
            for idx in indices:
                yield src.image(idx)


class SuggestKWidget(Container, SharedModelMixin):
    """Score numbers of clusters K = smallest..largest on the viewer's model, without labels.

    For each K, k-means runs ``runs per K`` times on a sample of the model's code vectors of
    the chosen images: the *Calinski-Harabasz* index (CH) says how much of the codes' spread
    the K clusters explain for the clusters they cost, the *silhouette* how well separated
    they are, the *stability* (mean adjusted Rand index between runs) how reproducible the
    partition is. The suggested K has the highest CH; when CH still rises at the largest K,
    when the runs disagree at the suggested K or when the silhouette is flat, the widget
    says there is no clear K instead. The last result is ``widget.scores``
    (:class:`~napari_stego.choose_k.KScores`).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        warm_imports()
        self.viewer = napari_viewer
        self.store = model_store(napari_viewer)
        self.scores: KScores | None = None
        self.picker = LayerPicker(napari_viewer, label="Images to sample",
                                  tooltip="Image layers whose codes are sampled: the images "
                                          "you want to segment (the model's own, or others).")
        self.slices = ComboBox(label="stacks", choices=[ALL_SLICES, CURRENT_SLICE],
                               value=ALL_SLICES,
                               tooltip="For 3D / time stacks: sample every slice, or only "
                                       "the shown one (faster).")
        self.k_min = SpinBox(label="smallest K", value=2, min=2, max=256,
                             tooltip="Smallest number of clusters scored.")
        self.k_max = SpinBox(label="largest K", value=12, min=2, max=256,
                             tooltip="Largest number of clusters scored.")
        self.seeds = SpinBox(label="runs per K", value=3, min=1, max=20,
                             tooltip="k-means runs per K, each on its own random 80 % of the "
                                     "sample; their agreement is the stability (1 run: no "
                                     "stability).")
        self.max_points = SpinBox(label="code vectors", value=10_000, min=100,
                                  max=1_000_000, step=1000,
                                  tooltip="Code vectors sampled over all chosen images "
                                          "(uniformly). More: steadier scores, slower.")
        self.run_button, self.cancel_button = run_buttons(
            "Suggest K", "Score the K range on the chosen layers in the background.")
        self.load_button = PushButton(text="Load model…",
                                      tooltip="Use a model saved before (.stego file).")
        self.model_label = text()
        self.result = text()
        self.status = text()
        from ._plots import themed_canvas

        self.figure, self.canvas = themed_canvas(napari_viewer, (4, 3.2),
                                                 lambda: self.plot(self.scores), min_height=260)
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        form = Container(widgets=[self.slices, self.k_min, self.k_max, self.seeds,
                                  self.max_points])
        super().__init__(widgets=[self.model_label, self.load_button, self.picker, form,
                                  buttons, self.status, self.result], labels=False)
        insert_after(self, self.result, self.canvas)
        finish_layout(self)
        self._model_changed()
        self.plot(None)
        self.run_button.changed.connect(self.suggest)
        self.cancel_button.changed.connect(self.cancel)
        self.load_button.changed.connect(lambda: self.load_model())
        self.store.changed.connect(self._model_changed)
        self.picker.select_active()

    # ----------------------------------------------------------------------- suggest
    def suggest(self):
        """Start scoring in the background; returns the :class:`Job` (or ``None``)."""
        model = self.model
        k_min, k_max = int(self.k_min.value), int(self.k_max.value)
        try:
            if model is None:
                raise StegoError("no model yet: fit one with 'Fit STEGO' (any K) or press "
                                 "'Load model…'")
            if k_min > k_max:
                raise StegoError(f"smallest K ({k_min}) is above largest K ({k_max})")
            sources = self.picker.sources()
        except StegoError as exc:
            notify_error(exc, "Suggest K")
            return None
        only_current = self.slices.value == CURRENT_SLICE
        images = _Images([(src, [src.current_index(self.viewer)] if only_current
                           else src.indices()) for src in sources])
        from ..choose_k import ChooseKConfig

        config = ChooseKConfig(seeds=int(self.seeds.value), max_points=int(self.max_points.value))

        def work(progress, cancel):
            from ..choose_k import suggest_for_model

            def relay(stage: str, done: int, total: int) -> None:
                progress(_STAGES.get(stage, stage), done, total)

            return suggest_for_model(model, images, range(k_min, k_max + 1), config=config,
                                     progress=relay, cancel=cancel)

        def done(scores) -> None:
            self.scores = scores
            self.plot(scores)
            self.status.value = (f"scored K = {k_min}..{k_max} on {scores.n_points} code "
                                 "vectors")

        self.result.value = ""
        return self._start_job("Suggest K", work, on_done=done)

    # ----------------------------------------------------------------------- plot
    def plot(self, scores: KScores | None) -> None:
        """Draw the silhouette and stability curves of ``scores`` (an empty frame for
        ``None``) and say which K is suggested."""
        fig = self.figure
        fig.clear()
        ax = fig.add_subplot(111)
        ax.set_xlabel("number of clusters K")
        ax.set_ylabel("score")
        if scores is None:
            ax.text(0.5, 0.5, "press 'Suggest K'", ha="center", va="center",
                    transform=ax.transAxes, color="0.5")
            ax.set_xticks([])
            ax.set_yticks([])
            style_axes(fig, self.viewer)
            self.canvas.draw_idle()
            return
        ks = scores.k_values
        ch = [r.calinski_harabasz for r in scores.rows]
        top = max((v for v in ch if math.isfinite(v)), default=math.nan)
        if math.isfinite(top) and top > 0:
            ax.plot(ks, [v / top for v in ch], "D-", label="Calinski-Harabasz / max")
        sil = [r.silhouette for r in scores.rows]
        ax.plot(ks, sil, "o-", label="silhouette")
        stab = [r.stability for r in scores.rows]
        if not all(math.isnan(v) for v in stab):
            ax.plot(ks, stab, "s-", label="stability")
        ax.axvline(scores.best, color="tab:red", ls="--" if not scores.unclear else ":",
                   lw=1, label="top CH (no clear K)" if scores.unclear else "suggested K")
        if scores.current is not None and scores.current in ks and scores.current != scores.best:
            ax.axvline(scores.current, color="0.5", ls=":", lw=1,
                       label="model's K")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2,
                  frameon=False)
        style_axes(fig, self.viewer)
        self.canvas.draw_idle()
        if scores.unclear:
            self.result.value = (f"<b>{scores.unclear[0].upper()}{scores.unclear[1:]}.</b> "
                                 f"The highest Calinski-Harabasz index is at K = {scores.best}, "
                                 "which is not a number of classes here.")
        else:
            self.result.value = (f"<b>Suggested K = {scores.best}</b>: {scores.rule}. Refit "
                                 "with it in 'Fit STEGO'.")
