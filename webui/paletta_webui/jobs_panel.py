"""Queue and history: the server's job list (ListJobs) with cancel, and the approved outputs."""

from __future__ import annotations

import time

from nicegui import ui

import paletta
from paletta_webui.connection import Connection
from paletta_webui.logic import ACTIVE_STATES, asset_url, job_age, spec_summary, state_label

STATE_COLORS = {"queued": "grey", "running": "primary", "succeeded": "positive", "failed": "negative",
                "cancelled": "orange"}


class JobsPanel:
    """Refreshed when the status stream shows the queue or the running job changed (and on demand)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._seen: tuple = ()
        self._refreshing = False
        with ui.card().classes("w-full") as card:
            card.mark("jobs-panel")
            with ui.row().classes("w-full items-center justify-between"):
                ui.label("Queue and history").classes("text-lg font-medium")
                ui.button(icon="refresh", on_click=self.refresh).props('flat dense round aria-label="Refresh"')
            self.list = ui.column().classes("w-full gap-1")
        connection.hub.changed.subscribe(self._status_changed)

    async def _status_changed(self) -> None:
        status = self.connection.hub.latest
        if status is None or self.connection.hub.online is False:
            return
        seen = (status.queue_length, status.running_job, int(time.time() // 10))
        if seen != self._seen:
            self._seen = seen
            await self.refresh()

    async def refresh(self) -> None:
        if self._refreshing:
            return
        self._refreshing = True
        try:
            jobs = await self.connection.client.list_jobs(limit=15)
        except paletta.PalettaError:
            return
        finally:
            self._refreshing = False
        now = time.time()
        self.list.clear()
        with self.list:
            if not jobs:
                ui.label("No jobs yet").classes("text-sm opacity-70")
            for job in jobs:
                state = state_label(job.state)
                with ui.row().classes("w-full items-center gap-2 no-wrap").mark(f"queue-{job.name}"):
                    ui.badge(state, color=STATE_COLORS.get(state, "grey")).classes("shrink-0")
                    with ui.column().classes("gap-0 grow min-w-0"):
                        ui.label(f"{job.capability} · {spec_summary(job)}").classes("text-sm truncate w-full")
                        ui.label(f"{job.name} · {job_age(job, now)} ago").classes("text-xs opacity-70")
                    if job.state in ACTIVE_STATES:
                        ui.button(icon="close", on_click=lambda n=job.name: self.cancel(n)).props(
                            f'flat dense round aria-label="Cancel {job.name}"'
                        ).tooltip("Cancel")

    async def cancel(self, name: str) -> None:
        try:
            await self.connection.client.cancel_job(name)
        except paletta.PalettaError as err:
            ui.notify(str(err), type="negative")
        await self.refresh()


class ApprovedStrip:
    """Approved outputs (ListApprovedOutputs), newest job first."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        with ui.card().classes("w-full") as card:
            card.mark("approved")
            ui.label("Approved").classes("text-lg font-medium")
            self.grid = ui.element("div").classes("paletta-cards w-full")

    async def refresh(self) -> None:
        try:
            approved = await self.connection.client.list_approved(limit=24)
        except paletta.PalettaError:
            return
        self.grid.clear()
        with self.grid:
            if not approved:
                ui.label("Nothing approved yet").classes("text-sm opacity-70")
            for item in approved:
                if not item.output.asset.name:
                    continue
                with ui.column().classes("gap-0").mark(f"approved-{item.job}-{item.output.index}"):
                    ui.image(asset_url(item.output.asset.name)).classes("w-full").props(
                        f'alt="approved {item.job} #{item.output.index}"'
                    )
                    ui.label(f"{item.job} #{item.output.index} · {item.capability}").classes("text-xs")
