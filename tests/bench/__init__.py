"""Benchmarks: ``python -m tests.bench`` prints figures; nothing here is a timed test."""


class NullSink:
    """A ProgressSink that drops everything: what a direct engine call reports to."""

    def progress(self, step, total, stage):
        pass

    def preview(self, image, step):
        pass

    def check_cancelled(self):
        pass
