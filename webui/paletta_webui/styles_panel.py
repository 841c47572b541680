"""Style LoRAs from StyleService.ListStyles: a checkbox and weight per style, trigger words shown."""

from __future__ import annotations

from nicegui import ui

import paletta
from paletta.v1 import style_service_pb2
from paletta_webui.modes import STYLE_MODES, Mode


class StylesPanel:
    def __init__(self) -> None:
        self.chosen: dict[str, ui.checkbox] = {}
        self.weights: dict[str, ui.slider] = {}
        with ui.expansion("Styles", icon="palette").classes("w-full") as self.box:
            self.box.mark("styles")
            self.reason = ui.label("").classes("text-sm text-orange-9")
            self.error = ui.label("").classes("text-sm text-negative")
            self.list = ui.column().classes("w-full gap-1")

    async def load(self, client: paletta.AsyncClient) -> None:
        try:
            styles = await client.list_styles()
        except paletta.PalettaError:
            return
        self.render(styles)

    def render(self, styles: list[style_service_pb2.Style]) -> None:
        self.list.clear()
        self.chosen.clear()
        self.weights.clear()
        with self.list:
            for style in styles:
                with ui.column().classes("w-full gap-0"):
                    with ui.row().classes("items-center w-full no-wrap gap-2"):
                        self.chosen[style.name] = ui.checkbox(style.label or style.name).mark(f"style-{style.name}")
                        slider = ui.slider(min=0, max=2, step=0.05, value=style.default_weight or 1.0)
                        slider.classes("grow").props("label").mark(f"style-weight-{style.name}")
                        self.weights[style.name] = slider
                        ui.label().bind_text_from(slider, "value", lambda v: f"{v:.2f}").classes("text-xs w-8")
                    caption = style.best_for
                    if style.trigger_word:
                        caption += f" · trigger: “{style.trigger_word}”"
                    ui.label(caption).classes("text-xs opacity-70")

    def selection(self) -> dict[str, float]:
        return {name: float(self.weights[name].value) for name, box in self.chosen.items() if box.value}

    def set_mode(self, mode: Mode) -> None:
        allowed = mode.styles
        allowed_in = ", ".join(STYLE_MODES[:-1]) + " and " + STYLE_MODES[-1] if len(STYLE_MODES) > 1 else STYLE_MODES[0]
        self.reason.text = "" if allowed else f"{mode.label} refuses styles: they apply to {allowed_in} only."
        for element in [*self.chosen.values(), *self.weights.values()]:
            element.set_enabled(allowed)
        self.error.text = ""
