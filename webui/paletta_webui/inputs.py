"""Image inputs: the main image (with the mask brush over it), the IP-Adapter image prompt and
the control image. Each takes a file by picker, drag-and-drop or (main image) paste."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nicegui import events, ui

import paletta
from paletta_webui.connection import Connection
from paletta_webui.logic import asset_url
from paletta_webui.mask_editor import MaskEditor

# Without a mask the server repaints the image's transparent pixels (or says a mask is needed).
NO_MASK = "No mask painted: a cut-out's transparent pixels are repainted"


class ImageSlot:
    """One image input: an upload (picker or drop), a preview, clear; holds the asset name."""

    def __init__(self, connection: Connection, slot: str, title: str, on_change: Callable[[], Any] | None = None,
                 preview: bool = True) -> None:
        self.connection = connection
        self.slot = slot
        self.asset = ""
        self.on_change = on_change
        with ui.column().classes("w-full gap-1 paletta-drop") as self.root:
            self.root.props(f"data-slot={slot}").mark(f"slot-{slot}")
            with ui.row().classes("w-full items-center justify-between no-wrap"):
                self.title = ui.label(title).classes("text-sm font-medium").mark(f"title-{slot}")
                self.clear_button = ui.button(icon="close", on_click=self.clear).props(
                    f'flat dense round aria-label="Clear {title}"'
                )
            self.upload = ui.upload(
                label="Pick or drop an image", auto_upload=True, on_upload=self._uploaded,
                max_file_size=64 * 1024 * 1024,
            ).props('accept="image/*" flat bordered').classes("w-full").mark(f"upload-{slot}")
            self.image = ui.image().classes("w-full max-h-48").props("fit=contain")
            self.image.set_visibility(False)
            self.show_preview = preview
            self.error = ui.label("").classes("text-sm text-negative")
        self.clear_button.set_visibility(False)

    async def _uploaded(self, e: events.UploadEventArguments) -> None:
        data = await e.file.read()
        try:
            asset = await self.connection.client.upload(data)
        except paletta.PalettaError as err:
            self.set_error(str(err))
            return
        self.upload.reset()
        self.set_asset(asset.name)

    def set_asset(self, asset: str) -> None:
        self.asset = asset
        self.set_error("")
        self.image.set_source(asset_url(asset) if asset else "")
        self.image.set_visibility(bool(asset) and self.show_preview)
        self.clear_button.set_visibility(bool(asset))
        if self.on_change is not None:
            self.on_change()

    def clear(self) -> None:
        self.set_asset("")

    def set_error(self, message: str) -> None:
        self.error.text = message


class InputImage(ImageSlot):
    """The main input image, shown under the mask brush; the mask is kept as PNG bytes."""

    def __init__(self, connection: Connection, on_change: Callable[[], Any] | None = None) -> None:
        super().__init__(connection, "image", "Input image", on_change, preview=False)
        self.mask: bytes | str | None = None
        with self.root:
            self.editor = MaskEditor(self._mask_changed).mark("mask-editor")
            with ui.column().classes("w-full gap-1") as self.mask_tools:
                with ui.row().classes("w-full items-center gap-2 no-wrap"):
                    ui.label("Brush").classes("text-sm shrink-0")
                    self.brush = ui.slider(min=2, max=200, value=32, on_change=lambda e: self.editor.set_prop(
                        "brush", e.value)).classes("grow").props("label").mark("brush-size")
                    self.erase = ui.switch("Erase", on_change=lambda e: self.editor.set_prop("erase", e.value))
                with ui.row().classes("gap-1"):
                    ui.button("Undo", icon="undo", on_click=self.editor.undo).props("flat dense no-caps")
                    ui.button("Clear", icon="layers_clear", on_click=self.editor.clear_mask).props(
                        "flat dense no-caps"
                    )
                    ui.button("Invert", icon="invert_colors", on_click=self.editor.invert).props("flat dense no-caps")
                with ui.row().classes("w-full items-center gap-2 no-wrap"):
                    self.auto_text = ui.input("Auto-mask: what to select", placeholder="the sky").classes("grow")
                    self.auto_button = ui.button("Auto-mask", on_click=self.auto_mask).props("no-caps")
                    self.auto_button.mark("auto-mask")
                self.mask_label = ui.label(NO_MASK).classes("text-xs opacity-70")
                self.mask_error = ui.label("").classes("text-sm text-negative")
        self.set_masking(False)

    def set_asset(self, asset: str) -> None:
        super().set_asset(asset)
        self.editor.set_source(asset_url(asset) if asset else "")
        self._mask_changed(None)

    def set_masking(self, on: bool) -> None:
        self.editor.set_prop("editable", on)
        self.mask_tools.set_visibility(on)

    def _mask_changed(self, png: bytes | str | None) -> None:
        self.mask = png
        self.mask_error.text = ""
        if png is None:
            self.mask_label.text = NO_MASK
        elif isinstance(png, str):
            self.mask_label.text = f"Mask: {png}"
        else:
            self.mask_label.text = f"Mask painted ({len(png) // 1024 + 1} KiB PNG)"

    def use_mask_asset(self, asset: str) -> None:
        """A mask from the server (auto-mask): loaded into the canvas, where it stays editable."""
        self._mask_changed(asset)
        self.editor.load_mask(asset_url(asset))

    async def auto_mask(self) -> None:
        text = (self.auto_text.value or "").strip()
        if not self.asset:
            self.set_error("Add an input image first")
            return
        if not text:
            self.auto_text.error = "Say what to select"
            self.auto_text.update()
            return
        self.auto_text.error = None
        self.auto_button.props("loading")
        try:
            segmentation = await self.connection.client.segment(self.asset, text).result()
        except paletta.PalettaError as err:
            self.mask_error.text = str(err)
            return
        finally:
            self.auto_button.props(remove="loading")
        self.use_mask_asset(segmentation.mask)
        self.mask_label.text = f"Auto-mask “{text}”: {segmentation.coverage:.0%} of the image (editable)"
