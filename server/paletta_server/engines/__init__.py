"""Engines: one module per capability family; the only place that imports diffusers,
transformers, spandrel, rembg or insightface. Every import of those is lazy."""
