"""The frame every page shares: header, the server-unreachable banner, the grid of columns."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from nicegui import ui

from paletta_webui.connection import SERVE_HINT, Connection

STYLE = """
<style>
  .paletta-grid { display: grid; gap: 1rem; width: 100%; grid-template-columns: minmax(0, 1fr); }
  @media (min-width: 1024px) {
    .paletta-grid { grid-template-columns: minmax(340px, 430px) minmax(0, 1fr) minmax(260px, 340px); }
  }
  .paletta-grid > * { min-width: 0; }
  .paletta-fields { display: grid; gap: .25rem .75rem; grid-template-columns: repeat(auto-fill, minmax(8.5rem, 1fr)); }
  .paletta-cards { display: grid; gap: .75rem; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); }
  .paletta-cards img { max-height: 320px; object-fit: contain; }
  .paletta-drop.dragover { outline: 2px dashed var(--q-primary); }
  .q-field__label { overflow: visible; }
  /* chips hold captions: they wrap inside their card instead of running past it */
  .q-chip { max-width: 100%; height: auto; }
  .q-chip__content { white-space: normal; overflow-wrap: anywhere; }
</style>
"""

# Drop an image file on any [data-slot] zone, or paste one anywhere (into the main input slot):
# the bytes go to the page's /inputs route, which stores them on the server; the tab then gets the asset.
DROP_AND_PASTE = """
<script>
(() => {
  async function send(file, slot) {
    if (!file || !file.type.startsWith("image/")) return;
    const reply = await fetch("/inputs", { method: "POST", body: file });
    const body = await reply.json();
    emitEvent("paletta_image", { slot, ...body });
  }
  document.addEventListener("dragover", (e) => {
    const zone = e.target.closest && e.target.closest("[data-slot]");
    if (zone) { e.preventDefault(); zone.classList.add("dragover"); }
  });
  document.addEventListener("dragleave", (e) => {
    const zone = e.target.closest && e.target.closest("[data-slot]");
    if (zone) zone.classList.remove("dragover");
  });
  document.addEventListener("drop", (e) => {
    const zone = e.target.closest && e.target.closest("[data-slot]");
    if (!zone) return;
    e.preventDefault();
    zone.classList.remove("dragover");
    send(e.dataTransfer.files[0], zone.dataset.slot);
  });
  document.addEventListener("paste", (e) => {
    for (const item of e.clipboardData.items) {
      if (item.kind === "file" && item.type.startsWith("image/")) { send(item.getAsFile(), "image"); break; }
    }
  });
})();
</script>
"""


class Banner:
    """Shown while the status stream is down: the server cannot be reached; hidden when it is back."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.card = ui.card().classes("w-full bg-red-1 text-red-10").props("flat bordered")
        with self.card, ui.row().classes("items-center gap-2 no-wrap"):
            ui.icon("cloud_off").classes("text-xl")
            self.text = ui.label("").classes("break-words")
        self.card.mark("server-banner")
        self.render()
        connection.hub.changed.subscribe(self.render)

    def render(self) -> None:
        hub = self.connection.hub
        self.card.set_visibility(hub.online is False)
        if hub.online is False:
            self.text.text = (
                f"Can't reach the Paletta server at {self.connection.address} ({hub.error}). "
                f"Start it with `{SERVE_HINT}`; the page reconnects by itself."
            )


@contextmanager
def frame(connection: Connection) -> Iterator[ui.element]:
    """Header and banner, then the three-column grid (one column under 1024 px) to fill."""
    ui.add_head_html(STYLE)
    ui.add_body_html(DROP_AND_PASTE)
    ui.page_title("Paletta")
    with ui.header().classes("items-center justify-between py-1 px-4 bg-slate-800"):
        ui.label("Paletta").classes("text-xl font-bold")
        ui.label(connection.address).classes("text-xs opacity-70")
    with ui.column().classes("w-full gap-2 p-2 sm:p-4"):
        Banner(connection)
        with ui.element("div").classes("paletta-grid") as grid:
            yield grid
