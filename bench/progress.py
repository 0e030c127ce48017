"""A one-line progress bar on stderr (a line per tenth of the work when stderr is not a terminal)."""
import sys
import time


class Progress:
    def __init__(self, total, stream=sys.stderr, width=30):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.width = width
        self.interactive = stream.isatty()
        self.started = time.monotonic()
        self.reported_tenths = -1

    def start(self, label):
        """Shows what is being measured now; call advance() when it is done."""
        elapsed = time.monotonic() - self.started
        remaining = elapsed / self.done * (self.total - self.done) if self.done else None
        filled = self.width * self.done // self.total
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{_minutes(elapsed)} elapsed, {'?' if remaining is None else _minutes(remaining)} left  {label}")
        if self.interactive:
            self.stream.write("\r" + line[:160].ljust(160))
            self.stream.flush()
        elif 10 * self.done // self.total > self.reported_tenths:
            self.reported_tenths = 10 * self.done // self.total
            print(line, file=self.stream, flush=True)

    def advance(self, count=1):
        self.done += count

    def close(self):
        elapsed = _minutes(time.monotonic() - self.started)
        print(("\r" if self.interactive else "") + f"{self.done}/{self.total} measurements in {elapsed}".ljust(
            160 if self.interactive else 0), file=self.stream, flush=True)


def _minutes(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
