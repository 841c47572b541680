"""The pipeline box: steps (JobSpec) from the form or from script lines ("[mode|style] text"),
run as one RunPipeline job; the running step is highlighted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nicegui import ui

from paletta import pipeline as pipeline_script
from paletta.v1 import job_spec_pb2
from paletta_webui.logic import step_summary


class PipelineBox:
    def __init__(self, add_form_step: Callable[[], job_spec_pb2.JobSpec | None],
                 run: Callable[[list[job_spec_pb2.JobSpec], bool], Any]) -> None:
        self.steps: list[job_spec_pb2.JobSpec] = []
        self._add_form_step = add_form_step
        self._run = run
        self.running_step: int | None = None
        with ui.expansion("Pipeline", icon="account_tree").classes("w-full") as self.box:
            self.box.mark("pipeline")
            ui.label("Each step runs on the previous step's image; a segment step makes the mask "
                     "the next inpaint step takes.").classes("text-xs opacity-70")
            self.list = ui.column().classes("w-full gap-1")
            ui.button("Add the form as a step", icon="add", on_click=self.add_form).props("flat dense no-caps")
            self.script = ui.textarea(
                "Script lines",
                placeholder="[generate|tarot] knight in a storm\n[auto_mask] the knight\n[inpaint] armor",
            ).classes("w-full").props("autogrow").mark("pipeline-script")
            ui.button("Add lines", icon="playlist_add", on_click=self.add_lines).props("flat dense no-caps")
            self.from_input = ui.switch("Start from the input image")
            self.error = ui.label("").classes("text-sm text-negative")
            self.run_button = ui.button("Run pipeline", icon="play_arrow", on_click=self.run).mark("run-pipeline")
        self.render()

    def add_form(self) -> None:
        spec = self._add_form_step()
        if spec is not None:
            self.steps.append(spec)
            self.render()

    def add_lines(self) -> None:
        try:
            self.steps.extend(pipeline_script.parse(self.script.value or "", has_image=bool(self.steps)))
        except ValueError as err:
            self.error.text = str(err)
            return
        self.error.text = ""
        self.script.value = ""
        self.render()

    def remove(self, index: int) -> None:
        del self.steps[index]
        self.render()

    def set_running(self, step: int | None) -> None:
        if step != self.running_step:
            self.running_step = step
            self.render()

    def render(self) -> None:
        self.list.clear()
        with self.list:
            if not self.steps:
                ui.label("No steps yet").classes("text-sm opacity-70")
            for i, spec in enumerate(self.steps):
                running = i == self.running_step
                with ui.row().classes("w-full items-center no-wrap gap-1" + (" bg-blue-1" if running else "")):
                    ui.icon("play_arrow" if running else "chevron_right").classes("shrink-0")
                    ui.label(f"{i + 1}. {step_summary(spec)}").classes("text-sm grow break-all").mark(f"step-{i}")
                    if running:
                        ui.label("running").classes("text-xs text-primary")
                    ui.button(icon="delete", on_click=lambda i=i: self.remove(i)).props(
                        f'flat dense round aria-label="Remove step {i + 1}"'
                    )

    async def run(self) -> None:
        if not self.steps:
            self.error.text = "Add a step first"
            return
        self.error.text = ""
        await self._run(list(self.steps), bool(self.from_input.value))
