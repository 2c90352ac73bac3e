"""The one exception type for mistakes a user can make (bad input, missing weights, ...).

The napari widgets show it as a notification and the CLI prints it on one line; anything
else that escapes is a bug.
"""


class StegoError(Exception):
    """A problem the user can fix; the message says how."""


class Cancelled(Exception):
    """Long work stopped because the user asked (the ``cancel`` event was set)."""


# How each entry point names the two settings the advice of WeightsMissing mentions.
ENTRY_WORDS = {
    "python": ("weights=PATH", "backbone=\"efficientnet_lite0\""),
    "cli": ("--weights PATH", "--backbone efficientnet_lite0"),
    "widget": ("the 'weights file' field of Fit STEGO", "the backbone efficientnet_lite0"),
}


class WeightsMissing(StegoError):
    """A backbone's pretrained weights are neither given, nor cached, nor downloadable now.

    ``str(exc)`` words the fix for Python; :meth:`advice` words it for another entry point
    (``"cli"``, ``"widget"``). The first sentence is always the fix.
    """

    def __init__(self, backbone: str, reason: str, official_file: str = "") -> None:
        self.backbone, self.reason, self.official_file = backbone, reason, official_file
        super().__init__(self.advice("python"))

    def advice(self, entry: str = "python") -> str:
        weights, offline = ENTRY_WORDS.get(entry, ENTRY_WORDS["python"])
        example = f" (the authors' {self.official_file} works)" if self.official_file else ""
        reason = self.reason.rstrip(". ")
        return (f"Give a local weights file with {weights}{example}: the weights of "
                f"{self.backbone} are not on this machine ({reason}). Or run `napari-stego weights "
                f"download {self.backbone}` on a machine with a network (it fills the Hugging "
                "Face cache; HF_HOME can point at a shared folder), or use "
                f"{offline}, which needs no download.")
