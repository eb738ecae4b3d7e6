"""The stats panel: what speculative decoding and the KV cache are doing, live."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from rich.color import Color as RichColor
from rich.segment import Segment
from rich.style import Style
from textual.app import ComposeResult, RenderResult
from textual.color import Color
from textual.containers import Horizontal, VerticalScroll
from textual.reactive import reactive
from textual.widgets import Label, ProgressBar, Sparkline

from beechat.backends.base import ModelInfo
from beechat.events import Stats
from beechat.format import NA, human_bytes, percent, rate

HISTORY_LIMIT: Final = 240  # sparkline samples kept per reply
BARS: Final = "▁▂▃▄▅▆▇█"


class ZeroBasedSparkline(Sparkline):
    """A sparkline whose bars measure from zero: a steady value draws a steady bar at its height,
    not a flat line at the bottom (Textual's Sparkline scales from the smallest sample to the
    largest, so 100% acceptance all along looked like 0%). `ceiling` fixes the top of the scale
    (1.0 for a fraction); without it the largest sample is the top."""

    def __init__(self, *, ceiling: float | None = None, summary_function: Callable[[Sequence[float]], float],
                 id: str | None = None) -> None:
        super().__init__([], summary_function=summary_function, id=id)
        self.ceiling = ceiling

    def render(self) -> RenderResult:
        _, base = self.background_colors
        low = base + self.get_component_styles("sparkline--min-color").color
        high = base + self.get_component_styles("sparkline--max-color").color
        return ZeroBasedBars(list(self.data or []), self.size.width, self.ceiling, self.summary_function, low, high)


class ZeroBasedBars:
    """One line of bars, each the summary of its share of `data`, scaled from 0 to the ceiling."""

    def __init__(self, data: list[float], width: int, ceiling: float | None,
                 summary: Callable[[Sequence[float]], float], low: Color, high: Color) -> None:
        self.data, self.width, self.ceiling, self.summary = data, width, ceiling, summary
        self.low, self.high = low, high

    def bars(self) -> list[tuple[str, float]]:
        """(bar character, height 0..1) per column; no data: the bottom line, as Textual draws it."""
        data, width = self.data, max(0, self.width)
        if not data:
            return [(BARS[0], 0.0)] * width
        top = self.ceiling if self.ceiling is not None else max(data)
        columns: list[tuple[str, float]] = []
        for column in range(width):
            start = column * len(data) // width
            end = max(start + 1, (column + 1) * len(data) // width)
            value = self.summary(data[start:end])
            height = min(1.0, max(0.0, value / top)) if top > 0 else 0.0
            columns.append((BARS[round(height * (len(BARS) - 1))], height))
        return columns

    def __rich_console__(self, console: object, options: object) -> list[Segment]:
        return [Segment(bar, Style(color=RichColor.from_rgb(*self.low.blend(self.high, height).rgb)))
                for bar, height in self.bars()]


class StatRow(Horizontal):
    """A name and its value on one line."""

    def __init__(self, name: str, *, id: str) -> None:
        super().__init__(id=id, classes="stat-row")
        self.stat_name = name
        self.value = NA

    def compose(self) -> ComposeResult:
        yield Label(self.stat_name, classes="stat-name")
        yield Label(NA, classes="stat-value")

    def set_value(self, value: str) -> None:
        if value != self.value:  # live stats arrive ten times a second; most rows stay the same
            self.value = value
            self.query_one(".stat-value", Label).update(value, layout=False)  # one line, fixed width


class StatsPanel(VerticalScroll):
    """Live decode and prefill rates, draft acceptance, KV cache and context use of the reply being
    generated (or the last one), plus the loaded model. Unknown values read "n/a"."""

    stats: reactive[Stats | None] = reactive(None, always_update=True, init=False)
    """The latest stats snapshot shown."""
    model_info: reactive[ModelInfo | None] = reactive(None, always_update=True, init=False)
    """The loaded model, or None while none is."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, can_focus=False)
        self.decode_history: list[float] = []
        """Decode tok/s samples of the current reply."""
        self.acceptance_history: list[float] = []
        """Draft acceptance samples of the current reply."""

    def compose(self) -> ComposeResult:
        yield Label("Model", classes="panel-title")
        yield StatRow("profile", id="stat-profile")
        yield StatRow("target", id="stat-target")
        yield StatRow("draft", id="stat-draft")
        yield StatRow("speculation", id="stat-speculation")
        yield Label("Reply", classes="panel-title")
        yield StatRow("decode", id="stat-decode")
        yield ZeroBasedSparkline(id="decode-sparkline", summary_function=max)
        yield StatRow("prefill", id="stat-prefill")
        yield StatRow("drafted", id="stat-drafted")
        yield StatRow("acceptance", id="stat-acceptance")
        yield ZeroBasedSparkline(id="acceptance-sparkline", summary_function=min, ceiling=1.0)
        yield StatRow("mean run", id="stat-mean-run")
        yield StatRow("draft len", id="stat-draft-len")
        yield Label("Memory", classes="panel-title")
        yield StatRow("KV cache", id="stat-kv")
        yield StatRow("KV types", id="stat-kv-types")
        yield StatRow("context", id="stat-context")
        yield ProgressBar(total=1, show_eta=False, id="context-gauge")
        yield StatRow("GPU", id="stat-gpu")

    def on_mount(self) -> None:
        self._show_stats(None)
        self._show_model(None)

    def start_reply(self) -> None:
        """Forget the sparkline samples of the previous reply."""
        self.decode_history.clear()
        self.acceptance_history.clear()

    def record(self, stats: Stats) -> None:
        """Show a snapshot and add its rates to the sparklines."""
        if stats.decode_tps is not None:
            self.decode_history.append(stats.decode_tps)
        if stats.acceptance is not None:
            self.acceptance_history.append(stats.acceptance)
        del self.decode_history[:-HISTORY_LIMIT]
        del self.acceptance_history[:-HISTORY_LIMIT]
        self.stats = stats

    def watch_stats(self, stats: Stats | None) -> None:
        self._show_stats(stats)

    def watch_model_info(self, info: ModelInfo | None) -> None:
        self._show_model(info)

    def _row(self, row_id: str, value: str) -> None:
        self.query_one(f"#{row_id}", StatRow).set_value(value)

    def _show_model(self, info: ModelInfo | None) -> None:
        self._row("stat-profile", info.profile if info else NA)
        self._row("stat-target", info.target if info else NA)
        self._row("stat-draft", (info.draft or NA) if info else NA)
        self._row("stat-speculation", info.speculation if info else NA)
        if self.stats is None:
            self._show_stats(None)

    def _show_stats(self, stats: Stats | None) -> None:
        info = self.model_info
        self._row("stat-decode", rate(stats.decode_tps) if stats else NA)
        prefill = rate(stats.prefill_tps) if stats else NA
        if stats is not None and stats.prefill_tokens is not None:
            prefill += f" ({stats.prefill_tokens} tok)"
        self._row("stat-prefill", prefill)
        if stats is not None and stats.drafted is not None:
            accepted = NA if stats.accepted is None else str(stats.accepted)
            source = f" ({stats.draft_source})" if stats.draft_source else ""
            self._row("stat-drafted", f"{stats.drafted} / accepted {accepted}{source}")
        else:
            self._row("stat-drafted", NA)
        self._row("stat-acceptance", percent(stats.acceptance) if stats else NA)
        mean_run = stats.mean_accepted_len if stats else None
        self._row("stat-mean-run", NA if mean_run is None else f"{mean_run:.2f} tok/pass")
        self._row("stat-draft-len", NA if stats is None or stats.draft_len is None else str(stats.draft_len))
        capacity = stats.kv_bytes_capacity if stats and stats.kv_bytes_capacity else (
            info.kv_bytes_capacity if info else None)
        used = stats.kv_bytes if stats else None
        kv = NA if used is None and capacity is None else f"{human_bytes(used)} / {human_bytes(capacity)}"
        self._row("stat-kv", kv)
        cache_k = (stats.cache_type_k if stats else None) or (info.cache_type_k if info else None)
        cache_v = (stats.cache_type_v if stats else None) or (info.cache_type_v if info else None)
        self._row("stat-kv-types", f"K {cache_k} · V {cache_v}" if cache_k or cache_v else NA)
        ctx_size = (stats.ctx_size if stats else None) or (info.n_ctx if info else None)
        ctx_used = stats.ctx_used if stats else None
        self._row("stat-context", f"{ctx_used if ctx_used is not None else NA} / {ctx_size or NA}")
        gauge = self.query_one("#context-gauge", ProgressBar)
        gauge.display = bool(ctx_size)
        if ctx_size:
            gauge.update(total=ctx_size, progress=ctx_used or 0)
        gpu = NA
        if stats is not None and stats.gpu_mem_total:
            gpu = f"{human_bytes(stats.gpu_mem_used)} / {human_bytes(stats.gpu_mem_total)}"
        self._row("stat-gpu", gpu)
        self.query_one("#decode-sparkline", Sparkline).data = sparkline_data(self.decode_history)
        self.query_one("#acceptance-sparkline", Sparkline).data = sparkline_data(self.acceptance_history)


def sparkline_data(samples: list[float]) -> list[float]:
    """The samples a sparkline draws (a copy: the history keeps growing)."""
    return list(samples)
