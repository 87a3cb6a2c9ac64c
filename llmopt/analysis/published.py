"""The papers' published tables as data, and the protocol each row was trained under (docs/protocol.md).

A run is put beside a published figure only if its resolved config follows that row's protocol: model flavor,
steps, batch, data and the optimizer settings that make the row (`protocol_mismatches`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    ppl: float
    memory_gb: float | None = None
    loss: float | None = None
    step: int | None = None          # the step of the figure, where a paper gives several


# measure: which of our two perplexities the paper's figure matches (protocol.md section 1)
TABLES = {
    "scale_table": {"title": "SCALE headline table (arXiv 2506.16659), C4 perplexity",
                    "measure": "paper", "sizes": ["60m", "130m", "350m", "1b", "7b"],
                    "rows": ["adam", "stable_spam", "muon", "galore", "fira", "swan", "apollo", "apollo_mini",
                             "scale"]},
    "scale_ablation": {"title": "SCALE normalization ablation (arXiv 2506.16659), C4 perplexity",
                       "measure": "paper", "sizes": ["60m", "130m", "350m"],
                       "rows": ["sign", "row", "spectral", "column", "column_momentum", "spectral_momentum",
                                "sign_momentum", "row_momentum"]},
    "sgd_ll_table": {"title": "SGD-LL table (arXiv 2605.17787), C4 perplexity (token-weighted)",
                     "measure": "exact", "sizes": ["130m", "350m", "1b"], "rows": ["adam", "sgd", "sgd_ll"]},
    "ema_nesterov": {"title": "EMA-Nesterov runs (arXiv 2605.25395), C4 perplexity (token-weighted)",
                     "measure": "exact", "sizes": ["60m", "130m", "350m", "1b"], "rows": []},
}

HEADLINE_SIZES = ["60m", "130m", "350m", "1b"]
HEADLINE_PPL = {"adam": [30.05, 23.13, 18.77, 16.52], "stable_spam": [28.77, 22.20, 16.80, 13.97],
                "muon": [28.86, 22.20, 16.70, 14.18], "galore": [34.58, 25.31, 19.37, 15.57],
                "fira": [30.34, 22.96, 16.82, 15.10], "swan": [30.00, 22.83, 17.14, 14.42],
                "apollo": [30.94, 22.93, 16.75, 14.20], "apollo_mini": [31.85, 23.63, 17.11, 14.13],
                "scale": [30.81, 22.57, 16.32, 14.25]}
HEADLINE_MEMORY_GB = {"adam": [0.35, 0.81, 2.21, 8.04], "muon": [0.23, 0.54, 1.47, 5.36],
                      "scale": [0.15, 0.32, 0.80, 2.81]}

# 7B: perplexity at 40K / 80K / 120K / 150K steps, and memory
PUBLISHED_7B = {"scale": ([17.99, 14.57, 12.86, 12.59], 13.74), "apollo": ([17.55, 14.39, 13.23, 13.02], 16.14),
                "apollo_mini": ([18.03, 14.60, 13.32, 13.09], 14.53), "muon": ([16.43, 13.95, 12.85, 12.72], 26.95)}
STEPS_7B = [40000, 80000, 120000, 150000]

# the ICML version's 1B figures, where they differ (--published icml)
PUBLISHED_ICML_1B = {"adam": 15.79, "muon": 13.67, "scale": 13.49}

ABLATION_SIZES = ["60m", "130m", "350m"]
ABLATION = {"sign": [54.36, 40.42, 27.95], "row": [79.27, 37.67, 21.63], "spectral": [34.15, 25.25, 18.73],
            "column": [39.89, 28.85, 20.38], "column_momentum": [30.81, 22.57, 16.32],
            "spectral_momentum": [31.20, 22.33, 16.67]}

SGD_LL_SIZES = ["130m", "350m", "1b"]
SGD_LL = {"adam": [(3.11, 22.46), (2.78, 16.09), (2.51, 12.32)], "sgd": [(5.07, 158.90), (4.14, 63.22), (3.95, 51.87)],
          "sgd_ll": [(3.24, 25.70), (2.87, 17.35), (2.60, 13.47)]}


def published_numbers(version: str = "arxiv") -> dict[tuple[str, str, str], Published | dict[int, Published]]:
    """(table, row, size) -> Published; the 7B entries map step -> Published."""
    if version not in ("arxiv", "icml"):
        raise ValueError(f"published version must be arxiv or icml, got {version!r}")
    out: dict = {}
    for row, values in HEADLINE_PPL.items():
        for i, size in enumerate(HEADLINE_SIZES):
            memory = HEADLINE_MEMORY_GB[row][i] if row in HEADLINE_MEMORY_GB else None
            out[("scale_table", row, size)] = Published(values[i], memory)
    if version == "icml":
        for row, value in PUBLISHED_ICML_1B.items():
            out[("scale_table", row, "1b")] = Published(value, out[("scale_table", row, "1b")].memory_gb)
    for row, (curve, memory) in PUBLISHED_7B.items():
        out[("scale_table", row, "7b")] = {s: Published(p, memory, step=s) for s, p in zip(STEPS_7B, curve)}
    for row, values in ABLATION.items():
        for size, value in zip(ABLATION_SIZES, values):
            out[("scale_ablation", row, size)] = Published(value)
    for row, values in SGD_LL.items():
        for size, (loss, ppl) in zip(SGD_LL_SIZES, values):
            out[("sgd_ll_table", row, size)] = Published(ppl, loss=loss)
    return out


def lookup_published(published: dict, table: str, row: str, size: str, step: int | None) -> Published | None:
    """The published figure of a table cell; for a curve (7B), the last published step <= `step`."""
    entry = published.get((table, row, size))
    if not isinstance(entry, dict):
        return entry
    if step is None:
        return entry[max(entry)]
    reached = [s for s in entry if s <= step]
    return entry[max(reached)] if reached else None


# ---------------------------------------------------------------------------------------------------
# Protocols: resolved-config keys (dotted) and the values a table's runs were trained with (protocol.md
# sections 1-3; the same values tests/configs/resolved_configs/ holds for the experiment configs).

GALORE_DATA = {"data.name": "c4", "data.mode": "truncate_pad", "data.seq_len": 256}
GALORE_STEPS = {"60m": 11000, "130m": 20000, "350m": 60000, "1b": 100000, "7b": 150000}   # SCALE's 60M: 11K
NO_LOOKAHEAD = {"lookahead.name": "none"}


def _optimizer(name: str, **settings) -> dict:
    return {"optimizer.name": name, **{f"optimizer.{k}": v for k, v in settings.items()}, **NO_LOOKAHEAD}


# table -> {"sizes": {flavor: {key: value}}, "common": {key: value}, "rows": {row: {key: value}}}
PROTOCOLS = {
    "scale_table": {
        "sizes": {size: {"trainer.steps": steps, "trainer.global_batch_size": 512}
                  for size, steps in GALORE_STEPS.items()},
        "common": GALORE_DATA,
        "rows": {**{row: _optimizer(row) for row in TABLES["scale_table"]["rows"] if row != "scale"},
                 "scale": _optimizer("scale", normalization="column", momentum_on="output")}},
    "scale_ablation": {
        "sizes": {size: {"trainer.steps": GALORE_STEPS[size], "trainer.global_batch_size": 512}
                  for size in ABLATION_SIZES},
        "common": GALORE_DATA,
        "rows": {row: _optimizer("scale", normalization=row.removesuffix("_momentum"),
                                 momentum_on="output" if row.endswith("_momentum") else "none")
                 for row in TABLES["scale_ablation"]["rows"]}},
    "sgd_ll_table": {
        "sizes": {"130m": {"trainer.steps": 5000, "trainer.global_batch_size": 2048},
                  "350m": {"trainer.steps": 15000, "trainer.global_batch_size": 2048},
                  "1b": {"trainer.steps": 19125, "trainer.global_batch_size": 4096}},
        "common": GALORE_DATA,
        "rows": {row: _optimizer(row) for row in TABLES["sgd_ll_table"]["rows"]}},
}


def config_value(config: dict, dotted: str):
    """config["a"]["b"] for "a.b"; None where a level is missing."""
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def row_of(table: str, config: dict) -> str | None:
    """The published row of `table` whose optimizer settings the resolved config has, if any."""
    rows = PROTOCOLS.get(table, {}).get("rows", {})
    return next((row for row, spec in rows.items()
                 if all(config_value(config, key) == value for key, value in spec.items())), None)


def protocol_settings(table: str, row: str, size: str) -> dict | None:
    """The resolved-config values (dotted keys) the published cell (table, row, size) was trained with; None
    where the table has no protocol or not that size."""
    protocol = PROTOCOLS.get(table)
    if protocol is None or size not in protocol["sizes"]:
        return None
    return {"model.flavor": size, **protocol["sizes"][size], **protocol["common"], **protocol["rows"].get(row, {})}


def protocol_mismatches(table: str, row: str, size: str, config: dict) -> list[str]:
    """Where the resolved config departs from the protocol of the published cell (table, row, size), one
    "key is X, the paper's Y" per key; empty where it follows it, or where the table has no protocol."""
    if table not in PROTOCOLS:
        return []
    expected = protocol_settings(table, row, size)
    if expected is None:
        return [f"model.flavor is {config_value(config, 'model.flavor')}, the table's are "
                f"{', '.join(PROTOCOLS[table]['sizes'])}"]
    return [f"{key} is {config_value(config, key)}, the paper's {value}" for key, value in expected.items()
            if config_value(config, key) != value]
