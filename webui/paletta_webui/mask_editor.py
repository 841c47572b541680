"""The mask brush: the input image with a canvas over it (``mask_editor.js``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nicegui import events, ui

from paletta_webui.logic import decode_data_url, mask_is_empty


class MaskEditor(ui.element, component="mask_editor.js"):
    """Paint (or erase) a mask over ``source``; ``on_mask`` gets the mask PNG, or None when empty."""

    def __init__(self, on_mask: Callable[[bytes | None], Any]) -> None:
        super().__init__()
        self._props["src"] = ""
        self._props["editable"] = False
        self._props["brush"] = 32
        self._props["erase"] = False
        self._on_mask = on_mask
        self.on("mask", self._handle_mask)

    def _handle_mask(self, e: events.GenericEventArguments) -> None:
        url = e.args[0] if isinstance(e.args, list) else e.args
        png = decode_data_url(url) if url else b""
        self._on_mask(None if not png or mask_is_empty(png) else png)

    def set_source(self, url: str) -> None:
        self._props["src"] = url
        self.update()

    def set_prop(self, name: str, value: Any) -> None:
        self._props[name] = value
        self.update()

    def clear_mask(self) -> None:
        self.run_method("clear")

    def invert(self) -> None:
        self.run_method("invert")

    def undo(self) -> None:
        self.run_method("undo")

    def load_mask(self, url: str) -> None:
        self.run_method("load_mask", url)
