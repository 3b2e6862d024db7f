"""``reir report``: one self-contained HTML file to browse a database's results offline.

The file holds the metrics, the training curves (an inline PNG) and the best and worst
queries with their top-k results as small inline JPEG thumbnails: no server, no network,
no other files, so it can be mailed or archived as is. Queries are ranked by the share of
their top-k results that share their class (ties: the earlier first correct result wins).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import torch

from reir.data.images import read_image
from reir.errors import ReirError
from reir.plots.grids import shown_label
from reir.retrieval.collection_files import CollectionFiles, collection_files
from reir.retrieval.database import UNLABELLED, Database
from reir.retrieval.evaluation import evaluate_database
from reir.retrieval.results import Results
from reir.retrieval.similarity import knn

THUMBNAIL = 72
THUMBNAIL_SOURCE_PIXELS = 40_000_000  # larger images are shown as missing rather than decoded
# Recorded in the page's head (a meta tag, as reir.fileio.recorded_format reads it), so a later run
# knows the page is its own to replace.
REPORT_FORMAT = "reir-report/1"
GREEN, RED, GREY, BLUE = "#00aa00", "#dc0000", "#969696", "#0a5adc"


def thumbnail(files: CollectionFiles, path: str, size: int = THUMBNAIL) -> str:
    """A ``data:`` URL of a small JPEG of the image, or an empty string when it cannot be read or is not an
    image file of the collection."""
    found = files.image(path)
    if found is None:
        return ""
    try:
        image = read_image(found[0], THUMBNAIL_SOURCE_PIXELS)
    except ReirError:
        return ""
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves_png(statistics: Path) -> str:
    import matplotlib.pyplot as plt

    from reir.plots.curves import build_figure, read_statistics

    figure = build_figure(read_statistics(statistics), statistics.stem)
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=80)
    finally:
        plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def find_statistics(db: Database, db_path: Path) -> Path | None:
    """The training run's statistics CSV, beside the model file the database records."""
    name = db.config.get("save_name")
    candidates = [db_path.resolve().parent.parent / "statistics" / f"{name}_results.csv"] if name else []
    model_file = db.info.get("model_file")
    if model_file and name:
        candidates.append(Path(model_file).resolve().parent.parent / "statistics" / f"{name}_results.csv")
    return next((c for c in candidates if c.is_file()), None)


def rank_queries(db: Database, k: int) -> tuple[str, str, Results, torch.Tensor]:
    """Top-k of every query of the evaluation protocol, and each query's precision@k (-1 when unlabelled)."""
    splits = db.eval_splits if all(s in db.features for s in db.eval_splits) else (next(iter(db.features)),)
    query_split, gallery_split = splits[0], splits[-1]
    self_retrieval = query_split == gallery_split
    results = knn(db.features[query_split], db.features[gallery_split], k, exclude_self=self_retrieval)
    results = results.with_labels(db.labels(query_split), db.labels(gallery_split))
    labelled = torch.tensor([label != UNLABELLED for label in db.labels(query_split)], dtype=torch.bool)
    if not results.k:
        return query_split, gallery_split, results, torch.full((len(results),), -1.0)
    precision = torch.where(labelled, results.same_label().float().mean(dim=1), -1.0)
    return query_split, gallery_split, results, precision


def chosen_queries(results: Results, precision: torch.Tensor, count: int) -> tuple[list[int], list[int]]:
    """The best and worst ``count`` labelled queries (disjoint); with no labels, the first ones."""
    labelled = (precision >= 0).nonzero().flatten().tolist()
    if not labelled:
        return list(range(min(count, len(results)))), []
    same = results.same_label()

    def first_hit(row: int) -> int:
        hits = same[row].nonzero().flatten().tolist()
        return hits[0] if hits else results.k

    order = sorted(labelled, key=lambda r: (-precision[r].item(), first_hit(r), r))
    best = order[:count]
    worst = [r for r in reversed(order) if r not in best][:count]
    return best, worst


def query_rows(db: Database, files: CollectionFiles, query_split: str, gallery_split: str, rows: list[int],
               results: Results) -> str:
    thumbs: dict[str, str] = {}

    def cell(path: str, caption: str, label: str | None, colour: str) -> str:
        if path not in thumbs:
            thumbs[path] = thumbnail(files, path)
        picture = (f'<img src="{thumbs[path]}" alt="">' if thumbs[path] else '<div class="missing">missing</div>')
        return (f'<figure style="border-color:{colour}" title="{html.escape(path)}">{picture}'
                f'<figcaption>{html.escape(caption)}<span class="label">{html.escape(shown_label(label) or "?")}'
                f'</span></figcaption></figure>')

    out = []
    labels, gallery_labels = db.labels(query_split), db.labels(gallery_split)
    for row in rows:
        label = labels[row]
        cells = [cell(db.paths(query_split)[row], "query", label, BLUE)]
        for rank, (i, score) in enumerate(results.row(row), start=1):
            colour = GREY if UNLABELLED in (label, gallery_labels[i]) else GREEN if gallery_labels[i] == label else RED
            cells.append(cell(db.paths(gallery_split)[i], f"{rank}. {score:.3f}", gallery_labels[i], colour))
        out.append(f'<div class="row">{"".join(cells)}</div>')
    return "\n".join(out)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
table { border-collapse: collapse; } td, th { padding: .2rem .7rem; border-bottom: 1px solid #ddd; text-align: left; }
.row { display: flex; gap: .3rem; margin: .4rem 0; flex-wrap: wrap; }
figure { margin: 0; border: 4px solid; width: 84px; }
figure img, .missing { width: 100%; aspect-ratio: 1; object-fit: cover; display: block; }
.missing { background: #eee; font-size: .7rem; text-align: center; }
figcaption { font-size: .68rem; padding: 1px 2px; overflow-wrap: anywhere; }
figcaption .label { display: block; }
.note { color: #666; font-size: .9rem; }
img.curves { max-width: 100%; }
"""


def build_report(db: Database, db_path: Path, statistics: Path | None, k: int, count: int) -> str:
    title = db.config.get("save_name") or db_path.name
    try:
        files = collection_files([p for split in db.splits for p in db.paths(split)], db.info, db_path,
                                 "the database's images")
        refused = ""
    except ReirError as exc:
        files, refused = CollectionFiles([], None, None), str(exc)  # the report goes on, without thumbnails
    query_split, gallery_split, results, precision = rank_queries(db, k)
    best, worst = chosen_queries(results, precision, count)
    sections = [f"<h1>REIR report: {html.escape(title)}</h1>",
                f'<p class="note">{html.escape(str(db_path))} · '
                + ", ".join(f"{split} {len(t)} images" for split, t in db.features.items())
                + f" · embeddings {tuple(next(iter(db.features.values())).shape[1:])}"
                + (f" · epoch {db.info['epoch']}" if "epoch" in db.info else "") + "</p>"]
    if refused:
        sections.append(f'<p class="note">thumbnails not shown: {html.escape(refused)}</p>')
    try:
        metrics = evaluate_database(db, recalls=db.config.get("recalls") or [1, 2, 4, 8], with_nmi=False)
        if db.info.get("metrics", {}).get("nmi") is not None:
            metrics["nmi"] = db.info["metrics"]["nmi"]
        rows = "".join(f"<tr><th>{html.escape(key)}</th><td>{_percent(value)}</td></tr>"
                       for key, value in metrics.items() if value is not None)
        protocol = "test against itself" if query_split == gallery_split else f"{query_split} against {gallery_split}"
        sections.append(f"<h2>Metrics ({protocol})</h2><table>{rows}</table>")
    except ReirError as exc:
        sections.append(f'<h2>Metrics</h2><p class="note">not computed: {html.escape(str(exc))}</p>')
    if statistics is not None:
        sections.append(f'<h2>Training</h2><img class="curves" alt="training curves" src="{curves_png(statistics)}">')
    else:
        sections.append('<h2>Training</h2><p class="note">no statistics CSV found for this database</p>')
    caption = f"top {results.k} of the {gallery_split} split; green: same class, red: other class"
    if worst:
        sections.append(f'<h2>Best queries</h2><p class="note">{caption}</p><div id="best">'
                        + query_rows(db, files, query_split, gallery_split, best, results) + "</div>")
        sections.append(f'<h2>Worst queries</h2><p class="note">{caption}</p><div id="worst">'
                        + query_rows(db, files, query_split, gallery_split, worst, results) + "</div>")
    else:
        sections.append(f'<h2>Queries</h2><p class="note">{caption} (no labels: the first queries)</p><div id="best">'
                        + query_rows(db, files, query_split, gallery_split, best, results) + "</div>")
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="reir-format" content="{REPORT_FORMAT}">'
            f"<title>REIR report: {html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _percent(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{100 * value:.2f}%"
