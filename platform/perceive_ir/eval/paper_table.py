"""The papers' table: one row per published method (PSNR / SSIM per test set and their average, as the
all-in-one papers print it), the evaluated model's own row beside them, and its difference to a
reference row (Perceive-IR's by default).

The published rows come from a YAML file (``configs/eval/published_results.yaml``: per recipe, its
``columns`` and ``rows``, each row naming where its figures were read); ``columns`` of the suite's
``paper_table`` maps every published column to a row of this evaluation, written ``set/type/level``
(``set/type`` for a real test set).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from perceive_ir.eval.report import Row

__all__ = ["PaperTableConfig", "Published", "PaperTable", "load_published", "paper_table", "resolve_published_path",
           "AVERAGE"]

AVERAGE = "average"


@dataclass
class PaperTableConfig:
    recipe: str  # a section of the published file: three_task, five_task
    columns: dict[str, str]  # published column -> 'set/type/level' (or 'set/type') of this suite's table
    published: str = "configs/eval/published_results.yaml"  # relative: to the job's working folder
    reference: str = "Perceive-IR"  # the published row the model is compared with

    def row_keys(self) -> dict[str, tuple[str, str, str]]:
        keys = {}
        for column, where in self.columns.items():
            parts = where.split("/")
            if len(parts) not in (2, 3) or not all(parts[:2]):
                raise ValueError(f"paper_table.columns.{column}: '{where}' must read set/type/level or set/type")
            keys[column] = (parts[0], parts[1], parts[2] if len(parts) == 3 else "")
        return keys


@dataclass
class Published:
    columns: list[str]  # the test sets, then 'average'
    rows: dict[str, dict]  # method -> {psnr: [...], ssim: [...], source: ..., params_m: ...}


def load_published(path: Path, cfg: PaperTableConfig, suite_rows: Sequence[tuple[str, str, str]]) -> Published:
    """The recipe's published rows, checked against the suite before any model is loaded: every published
    test set is mapped to a row the suite scores, and the reference row exists."""
    if not path.is_file():
        raise FileNotFoundError(f"paper_table.published: '{path}' does not exist")
    recipes = yaml.safe_load(path.read_text()) or {}
    if cfg.recipe not in recipes:
        raise ValueError(f"paper_table.recipe '{cfg.recipe}' is not in {path}; it has: {', '.join(recipes)}")
    section = recipes[cfg.recipe]
    published = Published(list(section["columns"]), dict(section["rows"]))
    sets = [c for c in published.columns if c != AVERAGE]
    keys = cfg.row_keys()
    unmapped = [c for c in sets if c not in keys]
    unknown = [c for c in keys if c not in sets]
    if unmapped or unknown:
        raise ValueError(f"paper_table.columns must map each of {cfg.recipe}'s test sets ({', '.join(sets)}) to a row "
                         f"of the suite; " + "; ".join(filter(None, [
                             f"missing: {', '.join(unmapped)}" if unmapped else "",
                             f"not published: {', '.join(unknown)}" if unknown else ""])))
    scored = set(suite_rows)
    absent = [f"{c} -> {'/'.join(filter(None, keys[c]))}" for c in sets if keys[c] not in scored]
    if absent:
        raise ValueError(f"paper_table.columns name rows the suite does not score: {'; '.join(absent)}")
    if cfg.reference not in published.rows:
        raise ValueError(f"paper_table.reference '{cfg.reference}' is no row of {cfg.recipe} in {path}")
    for method, row in published.rows.items():
        if len(row["psnr"]) != len(published.columns) or len(row["ssim"]) != len(published.columns):
            raise ValueError(f"{path}: {cfg.recipe} row '{method}' needs {len(published.columns)} PSNR and SSIM values")
    return published


@dataclass
class PaperTable:
    recipe: str
    columns: list[str]
    published: dict[str, dict]
    model: str  # the row's label
    psnr: list[float] = field(default_factory=list)  # the model's, per column (average last)
    ssim: list[float] = field(default_factory=list)
    reference: str = "Perceive-IR"

    def delta(self) -> tuple[list[float], list[float]]:
        ref = self.published[self.reference]
        return ([a - b for a, b in zip(self.psnr, ref["psnr"])], [a - b for a, b in zip(self.ssim, ref["ssim"])])

    def markdown(self) -> str:
        head = "| method | " + " | ".join(self.columns) + " | source |"
        lines = [f"PSNR / SSIM, {self.recipe.replace('_', '-')} (published rows beside this model's)", "",
                 head, "|---|" + "---:|" * len(self.columns) + "---|"]
        for method, row in self.published.items():
            cells = [f"{p:.2f} / {s:.3f}" for p, s in zip(row["psnr"], row["ssim"])]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {row.get('source', '')} |")
        lines.append(f"| **{self.model}** | " + " | ".join(f"**{p:.2f} / {s:.3f}**" for p, s in zip(self.psnr, self.ssim))
                     + " | this evaluation |")
        dp, ds = self.delta()
        lines.append(f"| vs {self.reference} | " + " | ".join(f"{p:+.2f} / {s:+.3f}" for p, s in zip(dp, ds)) + " | |")
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> Path:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", *(f"{c}_{m}" for c in self.columns for m in ("psnr", "ssim")), "source"])
            for method, row in self.published.items():
                writer.writerow([method, *(v for pair in zip(row["psnr"], row["ssim"]) for v in pair), row.get("source", "")])
            writer.writerow([self.model, *(v for pair in zip(self.psnr, self.ssim) for v in pair), "this evaluation"])
        return path

    def metrics(self) -> dict[str, float]:
        dp, ds = self.delta()
        out = {}
        for k, column in enumerate(self.columns):
            out[f"paper/{column}/psnr"], out[f"paper/{column}/ssim"] = self.psnr[k], self.ssim[k]
        out["paper/delta_average/psnr"], out["paper/delta_average/ssim"] = dp[-1], ds[-1]
        return out


def paper_table(rows: Sequence[Row], cfg: PaperTableConfig, published: Published, model: str) -> PaperTable:
    """The model's row from this evaluation's table: each column's PSNR/SSIM out, and their mean as the
    average (the papers average the test sets' scores)."""
    by_key = {(r.set, r.type, r.level): r for r in rows}
    keys = cfg.row_keys()
    sets = [c for c in published.columns if c != AVERAGE]
    psnr = [by_key[keys[c]].psnr_out for c in sets]
    ssim = [by_key[keys[c]].ssim_out for c in sets]
    psnr.append(_mean(psnr))
    ssim.append(_mean(ssim))
    return PaperTable(cfg.recipe, sets + [AVERAGE], published.rows, model, psnr, ssim, cfg.reference)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def resolve_published_path(location: str, working_dir: Optional[Path]) -> Path:
    path = Path(location)
    return path if path.is_absolute() or working_dir is None else working_dir / path
