"""The GPU panel: fed by the process's one WatchStatus stream (no polling per tab)."""

from __future__ import annotations

from nicegui import ui

import paletta
from paletta_webui.connection import Connection
from paletta_webui.logic import human_bytes, memory_fraction, status_rows


class GpuPanel:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._models_key: tuple = ()
        with ui.card().classes("w-full") as card:
            card.mark("gpu-panel")
            ui.label("GPU").classes("text-lg font-medium")
            self.rows = ui.column().classes("gap-0 w-full")
            ui.label("Memory for models").classes("text-xs opacity-70 mt-1")
            self.memory = ui.linear_progress(value=0, show_value=False, size="10px").classes("w-full")
            self.memory_text = ui.label("").classes("text-xs")
            ui.label("Resident models").classes("text-sm font-medium mt-2")
            self.models = ui.column().classes("gap-1 w-full")
        self.render()
        connection.hub.changed.subscribe(self.render)

    def render(self) -> None:
        status = self.connection.hub.latest
        if status is None:
            return
        self.rows.clear()
        with self.rows:
            for label, value in status_rows(status):
                with ui.row().classes("w-full justify-between gap-2 no-wrap text-sm"):
                    ui.label(label).classes("opacity-70 shrink-0")
                    ui.label(value).classes("text-right break-all")
        self.memory.value = memory_fraction(status)
        self.memory_text.text = (
            f"{human_bytes(status.memory_used_bytes)} used of {human_bytes(status.memory_budget_bytes)}"
        )
        key = tuple((m.key, m.bytes) for m in status.loaded_models)
        if key == self._models_key:
            return
        self._models_key = key
        self.models.clear()
        with self.models:
            if not status.loaded_models:
                ui.label("none").classes("text-sm opacity-70")
            for model in status.loaded_models:
                with ui.row().classes("w-full items-center justify-between no-wrap gap-1"):
                    ui.label(f"{model.key} · {human_bytes(model.bytes)}").classes("text-sm break-all")
                    ui.button(icon="eject", on_click=lambda k=model.key: self.unload(k)).props(
                        f'flat dense round aria-label="Unload {model.key}"'
                    ).tooltip(f"Unload {model.key}").mark(f"unload-{model.key}")

    async def unload(self, key: str) -> None:
        try:
            freed = await self.connection.client.unload_models([key])
        except paletta.PalettaError as err:
            ui.notify(str(err), type="negative")
            return
        ui.notify(f"Unloaded {', '.join(freed.unloaded) or key} ({human_bytes(freed.freed_bytes)})")
