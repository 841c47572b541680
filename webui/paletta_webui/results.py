"""The variants grid: one view per job, one card per output with its own progress and live
preview while running, then the output with its seed, approve, download and follow-up actions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from nicegui import ui

import paletta
from paletta.results import result_of
from paletta.v1 import job_pb2
from paletta_webui.logic import (
    ACTIVE_STATES,
    asset_url,
    jpeg_data_url,
    output_step,
    spec_summary,
    state_label,
)


class Actions(Protocol):
    """What a card's buttons ask of the page."""

    client: paletta.AsyncClient

    def use_as_input(self, asset: str) -> None: ...
    def use_as_mask(self, asset: str) -> None: ...
    def use_as_prompt(self, text: str) -> None: ...
    def insert_chip(self, text: str) -> None: ...
    async def follow_up(self, capability: str, asset: str) -> None: ...
    async def approval_changed(self) -> None: ...


class OutputCard:
    """One output slot: a progress bar and live preview until the output is stored."""

    def __init__(self, view: JobView, slot: int) -> None:
        self.view = view
        self.slot = slot
        with ui.card().classes("w-full p-2 gap-1") as self.card:
            self.card.mark(f"card-{view.name}-{slot}")
            self.title = ui.label(f"Variant {slot + 1}").classes("text-sm font-medium")
            self.progress = ui.linear_progress(value=0, show_value=False).classes("w-full")
            self.stage = ui.label("waiting").classes("text-xs opacity-70")
            self.preview = ui.image().classes("w-full")
            self.preview.set_visibility(False)
            self.body = ui.column().classes("w-full gap-1")

    def show_progress(self, p: paletta.Progress, steps: int | None) -> None:
        title = f"Variant {p.variant + 1}"
        if p.pipeline_step is not None:
            title = f"Step {p.pipeline_step + 1}" + (f" / {steps}" if steps else "") + f" · variant {p.variant + 1}"
        self.title.text = title
        self.progress.value = p.fraction
        if p.stage == "queued":
            self.stage.text = f"queued, position {p.queue_position}"
        else:
            self.stage.text = f"{p.stage} {p.model} {p.step}/{p.total}".replace("  ", " ")
        if p.preview is not None:
            self.preview.set_source(jpeg_data_url(p.preview))
            self.preview.set_visibility(True)

    def show_output(self, output: job_pb2.JobOutput) -> None:
        actions = self.view.actions
        self.progress.set_visibility(False)
        self.stage.set_visibility(False)
        self.preview.set_visibility(False)
        step = output_step(output)
        title = f"#{output.index}"
        if step is not None:
            title = f"Step {step[0] + 1}: {step[1]} · #{output.index}"
        if output.seed:
            title += f" · seed {output.seed}"
        self.title.text = title
        self.card.mark(f"output-{self.view.name}-{output.index}")
        asset = output.asset.name if output.HasField("asset") else ""
        with self.body:
            if asset:
                ui.image(asset_url(asset)).classes("w-full").props(f'alt="output {output.index}" no-spinner')
            self._typed_result(output, actions)
            if not asset:
                return
            switch = ui.switch("Approved", value=output.approved).mark(f"approve-{self.view.name}-{output.index}")
            switch.on_value_change(lambda e, i=output.index: self.approve(i, bool(e.value)))
            with ui.row().classes("gap-1"):
                ui.button(icon="download").props(
                    f'flat dense href="{asset_url(asset)}?download=1" target="_blank" aria-label="Download"'
                ).tooltip("Download")
                ui.button("Use as input", on_click=lambda: actions.use_as_input(asset)).props("flat dense no-caps")
                if output.WhichOneof("result") == "segmentation":
                    ui.button("Use as mask", on_click=lambda: actions.use_as_mask(asset)).props("flat dense no-caps")
                ui.button("Upscale ×4", on_click=lambda: actions.follow_up("upscale", asset)).props(
                    "flat dense no-caps"
                )
                ui.button("Remove bg", on_click=lambda: actions.follow_up("remove_background", asset)).props(
                    "flat dense no-caps"
                )

    def _typed_result(self, output: job_pb2.JobOutput, actions: Actions) -> None:
        result = result_of(output)
        if isinstance(result, paletta.Caption):
            ui.label(result.text).classes("text-sm break-words")
            with ui.row().classes("w-full gap-1"):
                for chip in [result.text, *result.objects]:
                    ui.chip(chip, on_click=lambda c=chip: actions.insert_chip(c)).props("dense clickable")
        elif isinstance(result, paletta.Detections):
            if not result.detections:
                ui.label("nothing found").classes("text-sm opacity-70")
            for d in result.detections:
                ui.label(
                    f"{d.label} {d.score:.2f} at ({d.box.x_min:.0f}, {d.box.y_min:.0f}) "
                    f"{d.box.width:.0f}×{d.box.height:.0f}"
                ).classes("text-sm")
        elif isinstance(result, paletta.PromptExpansion):
            ui.label(result.expanded).classes("text-sm")
            ui.button("Use as prompt", on_click=lambda: actions.use_as_prompt(result.expanded)).props(
                "flat dense no-caps"
            )
        elif isinstance(result, paletta.Segmentation):
            ui.label(f"coverage {result.coverage:.0%}").classes("text-sm")
        elif isinstance(result, paletta.FaceIdentity):
            with ui.row().classes("w-full items-center no-wrap gap-2"):
                ui.image(asset_url(result.face_crop)).classes("w-16 h-16 shrink-0").props(
                    'alt="face crop" no-spinner fit=contain'
                ).mark(f"face-crop-{self.view.name}-{output.index}")
                box = result.box
                ui.label(
                    f"face {result.face_index + 1} of {result.faces_found} · score {result.score:.2f} at "
                    f"({box.x_min:.0f}, {box.y_min:.0f}) {box.width:.0f}×{box.height:.0f}"
                ).classes("text-sm")

    async def approve(self, index: int, approved: bool) -> None:
        try:
            await self.view.actions.client.approve_output(self.view.name, index, approved)
        except paletta.PalettaError as err:
            ui.notify(str(err), type="negative")
            return
        await self.view.actions.approval_changed()


class JobView:
    """A job's header and its cards; ``follow`` fills them from a job handle."""

    def __init__(self, actions: Actions, name: str = "", title: str = "", steps: int | None = None) -> None:
        self.actions = actions
        self.name = name
        self.steps = steps
        self.cards: list[OutputCard] = []
        self.finished = False
        self.on_step: Callable[[int | None], Any] | None = None
        with ui.column().classes("w-full gap-1") as self.root:
            with ui.row().classes("w-full items-center gap-2"):
                self.heading = ui.label(title).classes("text-sm font-medium break-all grow")
                self.state = ui.badge("").props("outline")
                self.cancel_button = ui.button("Cancel", on_click=self.cancel).props("flat dense no-caps")
            self.error = ui.label("").classes("text-sm text-negative")
            self.error.set_visibility(False)
            self.grid = ui.element("div").classes("paletta-cards w-full")

    def set_job(self, job: job_pb2.Job) -> None:
        self.name = job.name
        self.heading.text = f"{job.name} · {job.capability} · {spec_summary(job)}"
        self.state.text = state_label(job.state)
        self.root.mark(f"job-{job.name}")

    def card(self, slot: int) -> OutputCard:
        while len(self.cards) <= slot:
            with self.grid:
                self.cards.append(OutputCard(self, len(self.cards)))
        return self.cards[slot]

    def show_finished(self, job: job_pb2.Job) -> None:
        """A finished job as stored: its outputs, or why it failed."""
        self.set_job(job)
        for slot, output in enumerate(sorted(job.outputs, key=lambda o: o.index)):
            self.card(slot).show_output(output)
        self._end(job)

    def _end(self, job: job_pb2.Job) -> None:
        self.finished = True
        self.state.text = state_label(job.state)
        self.cancel_button.set_visibility(False)
        if job.state != job_pb2.JOB_STATE_SUCCEEDED:
            self.error.text = job.error.message or state_label(job.state)
            self.error.set_visibility(True)
            for card in self.cards:
                if card.progress.visible:
                    card.stage.text = state_label(job.state)

    async def follow(self, handle: paletta.AsyncJobHandle[Any]) -> job_pb2.Job | None:
        """Follow a (submitted) job to its end, card by card; returns the final job."""
        shown = 0

        def progress(p: paletta.Progress) -> None:
            if p.stage == "pipeline" and p.total and p.step >= p.total:
                return  # the pipeline's "all steps done" marker, after its last output: no card of its own
            self.state.text = "queued" if p.stage == "queued" else "running"
            if self.on_step is not None:
                self.on_step(p.pipeline_step)
            self.card(shown).show_progress(p, self.steps)

        try:
            async for output in handle.outputs(on_progress=progress):
                self.card(shown).show_output(output)
                shown += 1
        except paletta.JobFailed:
            pass  # the final job says why; shown below
        except paletta.PalettaError as err:
            self.error.text = str(err)
            self.error.set_visibility(True)
            return None
        finally:
            if self.on_step is not None:
                self.on_step(None)
        job = handle.job
        if job is not None:
            self.set_job(job)
            self._end(job)
        return job

    async def cancel(self) -> None:
        if not self.name:
            return
        try:
            job = await self.actions.client.cancel_job(self.name)
        except paletta.PalettaError as err:
            ui.notify(str(err), type="negative")
            return
        self.state.text = state_label(job.state)


def is_active(job: job_pb2.Job) -> bool:
    return job.state in ACTIVE_STATES
