"""The *napari-stego* panel: the five tools as tabs of one scrollable dock widget.

Five docked widgets stacked to almost three screen heights; as tabs they take one column
of the window, and each tab scrolls when the window is short, so the canvas keeps its
size on a 1280 x 1024 screen. The tools share the viewer's model as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from ._common import warm_imports

if TYPE_CHECKING:
    import napari

# tab title, attribute, widget class (imported when the panel is built)
TABS = (("Fit", "fit", "._fit:FitWidget"),
        ("Segment", "segment", "._segment:SegmentWidget"),
        ("Explore", "explore", "._correspondence:CorrespondenceWidget"),
        ("Evaluate", "evaluate", "._evaluate:EvaluateWidget"),
        ("Suggest K", "suggest", "._suggest:SuggestKWidget"))

PANEL_WIDTH = 380  # px: room for the forms' labels and fields, the rest for the canvas


def _widget_class(ref: str):
    from importlib import import_module

    module, name = ref.split(":")
    return getattr(import_module(module, __package__), name)


class StegoPanel(QWidget):
    """Fit / Segment / Explore / Evaluate / Suggest K as tabs, each in a scroll area.

    The tool widgets are ``panel.fit``, ``panel.segment``, ``panel.explore``,
    ``panel.evaluate`` and ``panel.suggest`` (the same classes as the single dock widgets).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        warm_imports()
        self.viewer = napari_viewer
        self.tabs = QTabWidget(self)
        self.tabs.setDocumentMode(True)
        self.tabs.setUsesScrollButtons(True)
        for title, attr, ref in TABS:
            tool = _widget_class(ref)(napari_viewer)
            setattr(self, attr, tool)  # keeps the magicgui container alive
            area = QScrollArea()
            area.setWidgetResizable(True)
            area.setFrameShape(QFrame.NoFrame)
            area.setHorizontalScrollBarPolicy(Qt.ScrollBarAsNeeded)
            area.setWidget(tool.native)
            self.tabs.addTab(area, title)
            self.tabs.setTabToolTip(self.tabs.count() - 1, (tool.__doc__ or "").split("\n")[0])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self.setMinimumWidth(PANEL_WIDTH - 80)

    def sizeHint(self) -> QSize:  # napari docks at the size hint: one column, any height
        return QSize(PANEL_WIDTH, 600)

    def show_tab(self, title: str) -> None:
        """Bring a tab to the front by its title ("Fit", "Segment", ...)."""
        titles = [self.tabs.tabText(i) for i in range(self.tabs.count())]
        self.tabs.setCurrentIndex(titles.index(title))
