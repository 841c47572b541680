"""The page: prompt (or a pipeline script), generate, live progress and preview, gallery with
approve, status panel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nicegui import ui

import paletta
from paletta_webui.logic import Generation, data_url, status_rows


class Workstation:
    """One browser tab's page, talking to the server only through a ``paletta.AsyncClient``."""

    def __init__(self, client: paletta.AsyncClient) -> None:
        self.client = client
        self.generation: Generation | None = None
        self.approved: set[tuple[str, int]] = set()

    def build(self) -> None:
        ui.label("Paletta").classes("text-2xl font-bold")
        with ui.row().classes("w-full items-start no-wrap"):
            with ui.column().classes("w-1/3"):
                self.prompt = ui.textarea("Prompt", placeholder="a knight in a misty forest").classes("w-full")
                # The seed's pipeline mode: each line is a step, "[mode|style] text" (see paletta.pipeline).
                self.pipeline_mode = ui.switch("Pipeline mode (one step per line)")
                with ui.row():
                    self.width = ui.number("Width", value=1024, step=16, min=16).classes("w-24")
                    self.height = ui.number("Height", value=1024, step=16, min=16).classes("w-24")
                    self.steps = ui.number("Steps (empty: default)", value=None, min=1, max=100).classes("w-20")
                with ui.row():
                    self.seed = ui.number("Seed (empty: random)", value=None).classes("w-40")
                    self.variants = ui.number("Variants", value=1, min=1, max=8).classes("w-24")
                self.button = ui.button("Generate", on_click=self.generate)
                self.progress = ui.linear_progress(value=0, show_value=False)
                self.stage = ui.label("")
                self.preview = ui.image().classes("w-64")
            with ui.column().classes("w-1/3"):
                ui.label("Outputs").classes("text-lg")
                self.gallery = ui.column()
            with ui.card().classes("w-1/3"):
                ui.label("Status").classes("text-lg")
                self.status_panel = ui.column()
        ui.timer(2.0, self.refresh_status)

    async def refresh_status(self) -> None:
        try:
            rows = status_rows(await self.client.status())
        except paletta.PalettaError as err:
            rows = [("Server", f"unreachable: {err.code.name}")]
        self.status_panel.clear()
        with self.status_panel:
            for label, value in rows:
                ui.label(f"{label}: {value}")

    def _int(self, element: Any, default: int | None = None) -> int | None:
        """The field's integer, or ``default`` when it is empty (None: the server's default)."""
        return int(element.value) if element.value not in (None, "") else default

    async def generate(self) -> None:
        prompt = (self.prompt.value or "").strip()
        if not prompt:
            ui.notify("Write a prompt first", type="warning")
            return
        self.button.disable()
        self.generation = state = Generation()
        self.progress.value = 0
        self.preview.set_source("")
        try:
            if self.pipeline_mode.value:
                job = await self.client.pipeline(prompt)
            else:
                job = await self.client.generate(
                    prompt,
                    width=self._int(self.width),
                    height=self._int(self.height),
                    steps=self._int(self.steps),
                    seed=None if self.seed.value in (None, "") else int(self.seed.value),
                    variants=self._int(self.variants, 1),
                )
            async for event in job:
                state.apply(event)
                self.progress.value = state.progress
                self.stage.text = f"{state.job}: {state.stage}"
                if event.HasField("preview"):
                    self.preview.set_source(data_url(state.preview_jpeg, "image/jpeg"))
                if event.HasField("output") and event.output.asset.name:
                    await self.add_output(state.job, event.output)
            if state.failed_message:
                ui.notify(f"{state.job}: {state.failed_message}", type="negative")
        except paletta.InvalidArgument as err:
            ui.notify(
                "; ".join(f"{v.field}: {v.description}" for v in err.field_violations) or str(err),
                type="negative",
            )
        except (paletta.PalettaError, ValueError) as err:  # ValueError: a mistake in a pipeline script
            ui.notify(str(err), type="negative")
        finally:
            self.button.enable()

    async def add_output(self, job: str, output: Any) -> None:
        data = await self.client.download(output.asset.name)
        with self.gallery, ui.card():
            ui.image(data_url(data, output.asset.mime or "image/png")).classes("w-64")
            ui.label(f"{job} #{output.index} · seed {output.seed}")
            button = ui.button("Approve")

            async def approve(index: int = output.index, button: Any = button) -> None:
                try:
                    await self.client.approve_output(job, index)
                except paletta.PalettaError as err:
                    ui.notify(str(err), type="negative")
                    return
                self.approved.add((job, index))
                button.text = "Approved ✓"
                button.disable()

            button.on_click(approve)


def make_root(client_factory: Callable[[], paletta.AsyncClient]) -> Callable[[], None]:
    """The root page function for ``ui.run``; one shared client made on first use."""
    holder: dict[str, paletta.AsyncClient] = {}

    def root() -> None:
        if "client" not in holder:
            holder["client"] = client_factory()
        Workstation(holder["client"]).build()

    return root
