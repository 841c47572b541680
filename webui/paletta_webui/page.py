"""The workstation page: modes and their forms, inputs and mask, prompt tools, styles, the
variants grid, queue and history, the GPU panel, the pipeline box. Every call goes through
the SDK's ``AsyncClient``; handlers await it directly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nicegui import events, ui

import paletta
from paletta.v1 import job_spec_pb2
from paletta_webui import modes
from paletta_webui.connection import CHANNEL_OPTIONS, Connection
from paletta_webui.frame import frame
from paletta_webui.gpu_panel import GpuPanel
from paletta_webui.inputs import ImageSlot, InputImage
from paletta_webui.jobs_panel import ApprovedStrip, JobsPanel
from paletta_webui.pipeline_box import PipelineBox
from paletta_webui.results import JobView, is_active
from paletta_webui.styles_panel import StylesPanel

RECENT_JOBS = 6


class Workstation:
    """One browser tab's page."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.client = connection.client
        self.mode = modes.MODES["generate"]
        self.fields: dict[str, dict[str, Any]] = {}
        self.containers: dict[str, ui.element] = {}
        self.prompt_history: list[str] = []
        self.views: list[JobView] = []

    # -- layout ----------------------------------------------------------------------------------

    def build(self) -> None:
        with frame(self.connection):
            with ui.column().classes("w-full gap-3"):
                self._build_form()
            with ui.column().classes("w-full gap-3"):
                with ui.card().classes("w-full"):
                    ui.label("Variants").classes("text-lg font-medium")
                    self.results = ui.column().classes("w-full gap-4").mark("results")
                self.approved = ApprovedStrip(self.connection)
            with ui.column().classes("w-full gap-3"):
                self.gpu = GpuPanel(self.connection)
                self.jobs = JobsPanel(self.connection)
        ui.on("paletta_image", self._dropped)
        self.connection.hub.reconnected.subscribe(self.load)
        self.set_mode("generate")
        ui.timer(0, self.load, once=True)

    def _build_form(self) -> None:
        with ui.card().classes("w-full gap-2"):
            self.mode_select = ui.select(
                {key: m.label for key, m in modes.MODES.items()}, label="Mode", value="generate",
                on_change=lambda e: self.set_mode(e.value),
            ).classes("w-full").mark("mode")
            self.input = InputImage(self.connection)
            with ui.column().classes("w-full gap-1") as self.ip_box:
                self.ip_slot = ImageSlot(self.connection, "image_prompt", "Image prompt (IP-Adapter)")
                with ui.row().classes("w-full items-center no-wrap gap-2"):
                    ui.label("Weight").classes("text-sm shrink-0")
                    self.ip_weight = ui.slider(min=0, max=2, step=0.05, value=0.7).props("label").classes("grow")
                    self.ip_weight.mark("ip-weight")
                    ui.label().bind_text_from(self.ip_weight, "value", lambda v: f"{v:.2f}").classes("text-xs w-8")
            self.control_slot = ImageSlot(self.connection, "control_image", "Control image")
            with ui.column().classes("w-full gap-1") as self.prompt_box:
                self.prompt = ui.textarea("Prompt").classes("w-full").props("autogrow").mark("prompt")
                with ui.row().classes("gap-1"):
                    self.enhance_button = ui.button("Enhance", icon="auto_awesome", on_click=self.enhance)
                    self.enhance_button.props("flat dense no-caps")
                    self.undo_enhance = ui.button("Undo enhance", icon="undo", on_click=self.undo_prompt).props(
                        "flat dense no-caps"
                    )
                    self.undo_enhance.set_visibility(False)
                    self.analyze_button = ui.button("Analyze", icon="search", on_click=self.analyze).props(
                        "flat dense no-caps"
                    )
                self.chips = ui.row().classes("w-full gap-1").mark("chips")
            for key, mode in modes.MODES.items():
                with ui.element("div").classes("paletta-fields w-full") as box:
                    self.fields[key] = {f.name: self._field(f) for f in mode.fields}
                self.containers[key] = box
            self.styles = StylesPanel()
            with ui.row().classes("w-full items-center gap-2"):
                self.run_button = ui.button("Run", icon="play_arrow", on_click=self.run).mark("run")
                self.form_error = ui.label("").classes("text-sm text-negative break-words").mark("form-error")
        self.pipeline = PipelineBox(self.form_step, self.run_pipeline)

    def _field(self, f: modes.Field) -> Any:
        if f.kind == "select":
            element: Any = ui.select(dict(f.options), label=f.label, value=f.default)
        elif f.kind == "bool":
            element = ui.switch(f.label, value=bool(f.default))
            element.classes("col-span-full")
        elif f.kind == "text":
            element = ui.input(f.label, placeholder=f.hint).classes("col-span-full")
        else:
            element = ui.number(f.label, value=f.default, min=f.min, max=f.max, step=f.step,
                                format="%.2f" if f.kind == "float" else None)
        if f.hint and f.kind != "text":
            element.tooltip(f.hint)
            if f.kind != "bool":
                element.props(f'hint="{f.hint}"')
        return element.mark(f"field-{f.name}")

    # -- mode and form ---------------------------------------------------------------------------

    def set_mode(self, key: str) -> None:
        self.mode = mode = modes.MODES[key]
        for other, box in self.containers.items():
            box.set_visibility(other == key)
        self.prompt_box.set_visibility(bool(mode.prompt))
        self.prompt.props(f'label="{mode.prompt or "Prompt"}"')
        self.input.root.set_visibility(mode.needs_image)
        self.input.title.text = mode.image_label
        self.input.set_masking(mode.needs_mask)
        self.ip_box.set_visibility(mode.image_prompt)
        self.control_slot.root.set_visibility(mode.needs_control)
        self.styles.set_mode(mode)
        self.clear_errors()

    def inputs(self) -> modes.Inputs:
        return modes.Inputs(
            prompt=self.prompt.value or "",
            image=self.input.asset,
            mask=self.input.mask,
            control=self.control_slot.asset,
            image_prompt=self.ip_slot.asset,
            image_prompt_weight=float(self.ip_weight.value) if self.ip_slot.asset else None,
            styles=self.styles.selection() if self.mode.styles else {},
        )

    def values(self) -> dict[str, Any]:
        return {name: element.value for name, element in self.fields[self.mode.key].items()}

    def clear_errors(self) -> None:
        for element in self.fields[self.mode.key].values():
            if hasattr(element, "error") and element.error:
                element.error = None
                element.update()
        self.prompt.error = None
        self.prompt.update()
        for slot in (self.input, self.ip_slot, self.control_slot):
            slot.set_error("")
        self.input.mask_error.text = ""
        self.styles.error.text = ""
        self.pipeline.error.text = ""
        self.form_error.text = ""

    def show_errors(self, errors: dict[str, str]) -> None:
        """Each message next to the element its field names; the rest under the Run button."""
        rest = []
        fields = self.fields[self.mode.key]
        for field, message in errors.items():
            slot = modes.error_slot(field)
            if slot in fields and hasattr(fields[slot], "error"):
                fields[slot].error = message
                fields[slot].update()
            elif slot == "prompt":
                self.prompt.error = message
                self.prompt.update()
            elif slot in ("image", "control_image", "image_prompt"):
                {"image": self.input, "control_image": self.control_slot, "image_prompt": self.ip_slot}[slot].set_error(
                    message
                )
            elif slot == "mask":
                self.input.mask_error.text = message
            elif slot == "styles":
                self.styles.error.text = f"{field}: {message}"
            elif slot == "pipeline":
                self.pipeline.error.text = f"{field}: {message}"
            else:
                rest.append(f"{field}: {message}")
        self.form_error.text = "; ".join(rest)

    def form_step(self) -> job_spec_pb2.JobSpec | None:
        self.clear_errors()
        inputs = self.inputs()
        if self.mode.prompt and self.mode.prompt_required and not inputs.prompt.strip():
            self.show_errors({"prompt": "Write a prompt first"})
            return None
        missing = modes.missing_inputs(self.mode, inputs)
        if self.mode.step_image and "image" in missing:  # identity's face is part of the step
            self.show_errors({"image": missing["image"]})
            return None
        return modes.step_spec(self.mode, inputs, self.values())

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        self.clear_errors()
        inputs = self.inputs()
        missing = modes.missing_inputs(self.mode, inputs)
        if missing:
            self.show_errors(missing)
            return
        try:
            handle = modes.submit(self.client, self.mode, inputs, self.values())
        except (ValueError, TypeError) as err:
            self.form_error.text = str(err)
            return
        variants = self.values().get("variants")
        await self.start(handle, f"{self.mode.label} · submitting…", int(variants or 1))

    async def run_pipeline(self, steps: list[job_spec_pb2.JobSpec], from_input: bool) -> None:
        self.clear_errors()
        if from_input and not self.input.asset:
            self.input.set_error("Add an input image to start the pipeline from")
            return
        handle = self.client.pipeline(steps, image=self.input.asset if from_input else None)
        view = await self.start(handle, "Pipeline · submitting…", 1, steps=len(steps), keep=True)
        if view is not None:
            view.on_step = None

    async def follow_up(self, capability: str, asset: str) -> None:
        """A card's Upscale ×4 / Remove bg."""
        if capability == "upscale":
            handle = self.client.upscale(asset, scale=4)
        else:
            handle = self.client.remove_background(asset)
        await self.start(handle, f"{capability} · submitting…", 1)

    async def start(self, handle: Any, title: str, cards: int, steps: int | None = None,
                    keep: bool = False) -> JobView | None:
        """Submit, show a view with a card per expected output, follow the job to its end."""
        with self.results:
            view = JobView(self, title=title, steps=steps)
        view.root.move(self.results, target_index=0)
        for slot in range(cards):
            view.card(slot)
        if steps is not None:
            view.on_step = self.pipeline.set_running
        try:
            await handle
        except paletta.InvalidArgument as err:
            view.root.delete()
            self.show_errors({v.field: v.description for v in err.field_violations} or {"request": str(err)})
            return None
        except paletta.PalettaError as err:
            view.root.delete()
            self.form_error.text = str(err)
            return None
        view.name = handle.name
        view.heading.text = f"{handle.name} · {title.split(' · ')[0]}"
        self.views.insert(0, view)
        await self.jobs.refresh()
        job = await view.follow(handle)
        if job is not None:
            view.set_job(job)
        await self.jobs.refresh()
        return view

    # -- what cards ask --------------------------------------------------------------------------

    def use_as_input(self, asset: str) -> None:
        self.input.set_asset(asset)
        ui.notify("Output is now the input image")

    def use_as_mask(self, asset: str) -> None:
        if not self.mode.needs_mask:
            self.mode_select.value = "inpaint"  # the mode that takes a mask
        self.input.use_mask_asset(asset)
        ui.notify("Mask loaded; paint to adjust it")

    def use_as_prompt(self, text: str) -> None:
        self.prompt_history.append(self.prompt.value or "")
        self.prompt.value = text
        self.undo_enhance.set_visibility(True)

    def insert_chip(self, text: str) -> None:
        current = (self.prompt.value or "").rstrip()
        self.prompt.value = f"{current}, {text}" if current else text

    async def approval_changed(self) -> None:
        await self.approved.refresh()

    # -- prompt tools ----------------------------------------------------------------------------

    async def enhance(self) -> None:
        prompt = (self.prompt.value or "").strip()
        if not prompt:
            self.show_errors({"prompt": "Write a short prompt to enhance"})
            return
        self.enhance_button.props("loading")
        try:
            expansion = await self.client.expand(prompt).result()
        except paletta.PalettaError as err:
            self.show_errors({"prompt": str(err)})
            return
        finally:
            self.enhance_button.props(remove="loading")
        self.use_as_prompt(expansion.expanded)

    def undo_prompt(self) -> None:
        if self.prompt_history:
            self.prompt.value = self.prompt_history.pop()
        self.undo_enhance.set_visibility(bool(self.prompt_history))

    async def analyze(self) -> None:
        if not self.input.asset:
            self.input.set_error("Add an input image to analyze")
            return
        self.analyze_button.props("loading")
        try:
            caption = await self.client.analyze(self.input.asset).result()
        except paletta.PalettaError as err:
            self.form_error.text = str(err)
            return
        finally:
            self.analyze_button.props(remove="loading")
        self.chips.clear()
        with self.chips:
            for chip in [caption.text, *caption.objects]:
                ui.chip(chip, icon="add", on_click=lambda c=chip: self.insert_chip(c)).props("dense clickable").mark(
                    "chip"
                )

    # -- restoring -------------------------------------------------------------------------------

    def _dropped(self, e: events.GenericEventArguments) -> None:
        args = e.args if isinstance(e.args, dict) else {}
        slot = {"image": self.input, "image_prompt": self.ip_slot, "control_image": self.control_slot}.get(
            args.get("slot", "image"), self.input
        )
        if args.get("asset"):
            slot.set_asset(args["asset"])
        else:
            slot.set_error(args.get("error", "upload failed"))

    async def load(self) -> None:
        """Recent jobs (running ones re-attached), approvals, styles, the queue: after a page load,
        and again when the server comes back."""
        await self.styles.load(self.client)
        try:
            recent = await self.client.list_jobs(limit=RECENT_JOBS)
        except paletta.PalettaError:
            return
        await self.approved.refresh()
        await self.jobs.refresh()
        shown = {view.name for view in self.views}
        for job in reversed(recent):
            if job.name in shown:
                continue
            with self.results:
                view = JobView(self)
            view.root.move(self.results, target_index=0)
            self.views.insert(0, view)
            if is_active(job):
                view.set_job(job)
                ui.timer(0, lambda v=view, n=job.name: v.follow(self.client.attach(n)), once=True)
            else:
                view.show_finished(job)


def make_root(client_factory: Callable[[], paletta.AsyncClient], cache_dir: Path | None = None) -> Callable[[], None]:
    """The root page function for ``ui.run``; one shared connection made on first use."""
    connection = Connection(client_factory, cache_dir)

    def root() -> None:
        connection.install()
        Workstation(connection).build()

    return root


def default_client(address: str, token: str | None = None, tls_root_cert: str | None = None) -> paletta.AsyncClient:
    return paletta.AsyncClient(address, token=token, tls_root_cert=tls_root_cert, options=CHANNEL_OPTIONS)
