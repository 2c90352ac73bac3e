"""Small matplotlib plots inside the widgets, in the colours of napari's theme.

:func:`themed_canvas` makes a figure canvas whose figure, axes, text and grid follow the
viewer's theme (dark, light, or a user theme) and are restyled when the theme changes; the
widget's ``draw`` callback redraws its content.
"""

from __future__ import annotations

from collections.abc import Callable

from ..labels import LABEL_OFFSET


def theme_colours(viewer) -> dict[str, str]:
    """Background, text and grid colours (hex) of the viewer's napari theme."""
    from napari.utils.theme import get_theme

    theme = get_theme(viewer.theme)

    def hex_of(name: str, default: str) -> str:
        colour = getattr(theme, name, None)
        return colour.as_hex() if hasattr(colour, "as_hex") else default

    return {"background": hex_of("background", "#262930"), "text": hex_of("text", "#f0f1f2"),
            "grid": hex_of("highlight", "#5a626c"), "accent": hex_of("current", "#7aa2f7")}


def style_axes(fig, viewer) -> dict[str, str]:
    """Colour ``fig`` and all its axes, labels, ticks and legends like the theme."""
    c = theme_colours(viewer)
    fig.patch.set_facecolor(c["background"])
    for ax in fig.axes:
        ax.set_facecolor(c["background"])
        for spine in ax.spines.values():
            spine.set_color(c["grid"])
        ax.tick_params(colors=c["text"], which="both")
        ax.xaxis.label.set_color(c["text"])
        ax.yaxis.label.set_color(c["text"])
        ax.title.set_color(c["text"])
        legend = ax.get_legend()
        if legend is not None:
            for text in legend.get_texts():
                text.set_color(c["text"])
        for text in ax.texts:
            text.set_color(c["text"])
    return c


def themed_canvas(viewer, figsize: tuple[float, float], draw: Callable[[], None],
                  min_height: int = 120):
    """A ``(figure, canvas)`` pair; ``draw()`` is called again whenever the theme changes."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, tight_layout=True)
    canvas = FigureCanvasQTAgg(figure)
    canvas.setMinimumHeight(min_height)
    viewer.events.theme.connect(lambda _event=None: draw())
    return figure, canvas


def fit_summary_text(info: dict) -> str:
    """One line on how a fit split the images: cluster shares, and a warning for clusters
    that hold almost nothing (K may be too large)."""
    shares = info.get("cluster_shares") or []
    if not shares:
        return ""
    # the ids the Labels layers show (1..K), not the 0-based indices
    parts = ", ".join(f"{k}: {100 * s:.0f} %" for k, s in enumerate(shares, LABEL_OFFSET))
    tiny = [k for k, s in enumerate(shares, LABEL_OFFSET) if s < 0.01]
    warn = (f" — cluster {', '.join(map(str, tiny))} holds under 1 % of the pixels: try a "
            "smaller K ('Suggest K')" if tiny else "")
    return f"cluster shares of the training pixels: {parts}{warn}"


def draw_fit_summary(fig, viewer, info: dict | None) -> None:
    """Cluster shares (bars) and the training loss (curve) of a fit, side by side."""
    fig.clear()
    if not info or not info.get("cluster_shares"):
        style_axes(fig, viewer)
        return
    c = theme_colours(viewer)
    bars, curve = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(1, 1.3)))
    shares = [100 * s for s in info["cluster_shares"]]
    bars.bar(range(len(shares)), shares, color=c["accent"])
    bars.set_xticks(range(len(shares)), [str(k + LABEL_OFFSET) for k in range(len(shares))])
    bars.set_xlabel("cluster", fontsize=8)
    bars.set_ylabel("% of pixels", fontsize=8)
    losses = info.get("loss_curve") or []
    if losses:
        steps = (info.get("steps") or len(losses))
        xs = [(i + 0.5) * steps / len(losses) for i in range(len(losses))]
        curve.plot(xs, losses, color=c["accent"], lw=1.2)
    curve.set_xlabel("training step", fontsize=8)
    curve.set_ylabel("loss", fontsize=8)
    for ax in (bars, curve):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
    style_axes(fig, viewer)
