"""A stand-in for ImageNet, built offline: a torchvision resnet18 classifier trained on characters that no
benchmark target uses, rendered from Debian's Noto fonts at the targets' image size.

ImageNet weights cannot be downloaded everywhere REIR runs, and the original's regime is fine-tuning
from a pretrained backbone. The source here is large and diverse and builds from registry packages
alone: ``fonts-noto-core`` draws about 24,000 characters of 143 scripts and symbol sets (cuneiform, Egyptian and
Anatolian hieroglyphs, Yi, Tangut, Bamum, Ethiopic, Canadian syllabics, Indic and South-East Asian
scripts, musical and other symbols) that matplotlib's DejaVu and STIX fonts do not map, and every character
target's classes are characters these fonts map (reir/data/glyphs.py, fonts.py, typefaces.py). One class is one
character, so the classes are many and fine-grained, as ImageNet's are for photographs.

Left out, so no target class is ever a pretraining class:

- every character the targets' fonts map (the glyph and font targets can only use these), and every
  character whose compatibility decomposition contains one (ligatures, letters with marks, styled
  letters); the digits' classes are digits, Fashion-MNIST's garments;
- look-alikes: a character whose rendering (in the first font that maps it) has cosine similarity
  >= ``--lookalike`` with some target character's rendering in Noto Sans/Serif, DejaVu Sans or STIX
  (Runic gebo and X, Coptic L-shaped ha and L);
- duplicates: characters the same fonts draw pixel for pixel alike (kept once).

The script then checks, from the targets' own definitions, that no class is a target class or
decomposes into one, and stops if any is. An image is one of the character's renderings (one per
Noto font that maps it: 1 to 8) under a random affine transform (scale, rotation, shear, shift) and,
for 2 images in 5, strokes half a pixel thicker or thinner; an epoch draws ``--draws`` images of
every class. Validation images are drawn once from another seed. Training is the scratch recipe of
reir/training/recipe.py (AdamW 1e-3, weight decay 0.05, cosine decay) in batches of 256.

Outputs, written together: ``--output`` (a safetensors torchvision state dict with its classifier:
``train.py --weights`` and ``benchmarks/accuracy.py --weights`` take it and drop the classifier) with
the record in its metadata, and beside it ``<output>.json``, the same record (source, classes, images,
epochs, accuracy, seconds, the command) with the weights file's SHA-256.

The defaults: every class (24,195 from fonts-noto-core 20201225), 8 draws a class an epoch (193,560
images), 8 epochs: 1.55 million training images, about 46 minutes on an idle 2-core CPU (a step at
24,195 classes takes 1.76 ms an image there; peak memory 1.9 GiB; docs/ACCURACY.md has the run's
record). The large classifier learns slowly at first (validation top-1 0.1 % after the first epoch,
3.5 % after the second, 40.5 % after the third, 95.3 % after the eighth). Longer runs (``--draws 16
--epochs 20``, 7.7 million images, about 3.8 hours on that CPU) or a GPU (``--device cuda``, limited
by the augmentation on the CPU) see each class more often. A small run for a CPU's minutes:

    apt-get install -y fonts-noto-core
    python benchmarks/pretrain.py --classes 1000 --draws 16 --epochs 4 --output pretrained/small.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fontTools.unicodedata
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import ImageFont

from reir.data.fonts import TEST_CHARACTERS, TRAIN_FONTS, shared_characters
from reir.data.glyphs import (
    DRAWN_CATEGORIES,
    FONT_SIZE,
    IMAGE_SIZE,
    candidate_characters,
    class_name,
    font_characters,
    font_folder,
    render,
)
from reir.data.glyphs import FONTS as TARGET_FONTS
from reir.data.typefaces import LIBERATION, matplotlib_dejavu
from reir.data.typefaces import candidate_characters as typeface_characters
from reir.errors import ReirError
from reir.fileio import atomic_files, load_tensors, save_tensors
from reir.training.recipe import SCRATCH

NOTO = Path("/usr/share/fonts/truetype/noto")
FORMAT = "reir-pretrain/1"
# Fonts that draw target characters, for the look-alike check: the targets' own and Noto's Latin ones.
REFERENCE_FONTS = ("NotoSans-Regular.ttf", "NotoSerif-Regular.ttf")
TARGET_REFERENCE_FONTS = ("DejaVuSans.ttf", "STIXGeneral.ttf")
BATCH_SIZE = 256


def target_classes() -> dict[str, set[int]]:
    """The classes each character target can have, from the targets' own code: glyphs' are characters its
    fonts draw (any of them, whatever the font count), the unseen-typeface set's are its training fonts'
    shared characters and the letters and digits, the many-class one's the characters both its font sets
    map (without Debian's Liberation fonts, its training fonts' shared characters: a superset); the
    digits' are the ten digits."""
    folder = font_folder()
    dejavu = matplotlib_dejavu()
    try:
        typefaces = set(typeface_characters(dejavu, LIBERATION))
    except ReirError:  # fonts-liberation not installed here
        typefaces = set(shared_characters(dejavu.folder, dejavu.names))
    return {"glyphs": set(candidate_characters(font_characters(folder), 1)),
            "fonts": set(shared_characters(folder, TRAIN_FONTS)) | set(TEST_CHARACTERS),
            "typefaces": typefaces,
            "digits": set(map(ord, "0123456789"))}


def target_font_characters() -> set[int]:
    """Every code point a font of the targets maps: a superset of every target's classes."""
    from fontTools.ttLib import TTFont

    return set().union(*(TTFont(font_folder() / name, lazy=True).getBestCmap() for name in TARGET_FONTS))


def decomposes_into(point: int, characters: set[int]) -> bool:
    """``point`` is one of ``characters`` or its compatibility decomposition holds one (marks aside)."""
    if point in characters:
        return True
    return any(ord(c) in characters for c in unicodedata.normalize("NFKD", chr(point)) if not unicodedata.combining(c))


def check_disjoint(points, targets: dict[str, set[int]]) -> None:
    """Stop unless no pretraining class is, or decomposes into, a class of any target."""
    for name, classes in targets.items():
        shared = [p for p in points if decomposes_into(p, classes)]
        if shared:
            raise SystemExit(f"error: {len(shared)} pretraining classes are classes of the {name} target "
                             f"({', '.join(class_name(p) for p in shared[:5])}, ...); exclude them")


def source_fonts(folders: list[Path]) -> list[Path]:
    fonts = sorted(path for folder in folders for path in folder.glob("*") if path.suffix.lower() in (".ttf", ".otf"))
    if not fonts:
        raise SystemExit(f"error: no .ttf/.otf fonts in {', '.join(map(str, folders))}; install them with "
                         "`apt-get install -y fonts-noto-core` or pass --font_dir")
    return fonts


def source_characters(fonts: list[Path], excluded: set[int]) -> dict[int, list[Path]]:
    """Visible characters the fonts map, none of them (nor what they decompose into) in ``excluded``:
    code point -> the fonts that map it."""
    from fontTools.ttLib import TTFont

    drawn: dict[int, list[Path]] = {}
    for font in fonts:
        for point in TTFont(font, lazy=True).getBestCmap():
            if unicodedata.category(chr(point))[0] in DRAWN_CATEGORIES and not decomposes_into(point, excluded):
                drawn.setdefault(point, []).append(font)
    return dict(sorted(drawn.items()))


def drawing(face: ImageFont.FreeTypeFont, point: int) -> np.ndarray | None:
    """reir/data/glyphs.py's rendering, or None for a character the text layout refuses."""
    try:
        return render(face, point)
    except RuntimeError:
        return None


def render_classes(drawn: dict[int, list[Path]]) -> dict[int, np.ndarray]:
    """Each character's renderings ``[fonts, IMAGE_SIZE, IMAGE_SIZE]`` (blank ones dropped); characters
    drawn pixel for pixel alike by the same fonts are kept once."""
    faces: dict[Path, ImageFont.FreeTypeFont] = {}
    images, seen = {}, set()
    for point, fonts in drawn.items():
        rendered = []
        for font in fonts:
            if font not in faces:
                faces[font] = ImageFont.truetype(str(font), FONT_SIZE)
            pixels = drawing(faces[font], point)
            if pixels is not None:
                rendered.append(pixels)
        signature = b"".join(p.tobytes() for p in rendered)
        if rendered and signature not in seen:
            seen.add(signature)
            images[point] = np.stack(rendered)
    return images


def reference_renderings(characters: set[int], fonts: list[Path]) -> torch.Tensor:
    """Target characters drawn by each reference font that maps them, flattened and L2-normalised."""
    from fontTools.ttLib import TTFont

    rows = []
    for font in fonts:
        face, cmap = ImageFont.truetype(str(font), FONT_SIZE), TTFont(font, lazy=True).getBestCmap()
        drawn = [p for p in sorted(characters & set(cmap)) if unicodedata.category(chr(p))[0] in DRAWN_CATEGORIES]
        rows += [pixels for point in drawn if (pixels := drawing(face, point)) is not None]
    return F.normalize(torch.as_tensor(np.stack(rows), dtype=torch.float32).flatten(1), dim=1)


def lookalikes(images: dict[int, np.ndarray], references: torch.Tensor, threshold: float) -> dict[int, float]:
    """Characters whose first rendering is at least ``threshold`` cosine-similar to a reference."""
    points = list(images)
    found = {}
    for start in range(0, len(points), 2048):
        chunk = points[start:start + 2048]
        flat = F.normalize(torch.as_tensor(np.stack([images[p][0] for p in chunk]), dtype=torch.float32).flatten(1),
                           dim=1)
        best = (flat @ references.T).max(1).values
        found.update({p: float(b) for p, b in zip(chunk, best) if b >= threshold})
    return found


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine (scale 0.8-1.1, rotation +-10 degrees, shear +-0.15, shift +-2 px) and, for 2 images
    in 5, strokes half a pixel thicker or thinner: ``[N, 1, S, S]`` in [0, 1]."""
    n = len(images)

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    scale, angle, shear = uniform(0.8, 1.1), uniform(-math.pi / 18, math.pi / 18), uniform(-0.15, 0.15)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (4 / IMAGE_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Half a pixel on each side: the mean of the image and its 3x3 maximum (or minimum), since a full
    # pixel blots dense characters or erases thin strokes at 32 px.
    stroke = torch.rand(n, generator=generator)
    thicker, thinner = stroke < 0.2, (stroke >= 0.2) & (stroke < 0.4)
    out[thicker] = (out[thicker] + F.max_pool2d(out[thicker], 3, 1, 1)) / 2
    out[thinner] = (out[thinner] - F.max_pool2d(-out[thinner], 3, 1, 1)) / 2
    return out


def draw(images: list[torch.Tensor], classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random rendering of each class in ``classes`` (``images[c]``: its renderings), augmented."""
    picked = torch.stack([images[c][torch.randint(len(images[c]), (1,), generator=generator)][0]
                          for c in classes.tolist()])
    return augment(picked[:, None].float() / 255, generator)


def evaluate(model, images, labels, mean, std, device) -> tuple[float, float]:
    """Top-1 and top-5 accuracy on fixed validation images."""
    model.eval()
    top1 = top5 = 0
    with torch.no_grad():
        for start in range(0, len(images), 1024):
            batch = normalise(images[start:start + 1024], mean, std).to(device)
            best = model(batch).topk(5, dim=1).indices.cpu()
            truth = labels[start:start + 1024, None]
            top1 += int((best[:, :1] == truth).sum())
            top5 += int((best == truth).any(1).sum())
    return top1 / len(images), top5 / len(images)


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Grey ``[N, 1, S, S]`` to the 3 channels a torchvision ResNet takes, normalised as targets normalise
    theirs (by the training images' own mean and deviation)."""
    return ((images - mean) / std).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


def package_version(name: str) -> str | None:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True,
                              check=True).stdout or None
    except (OSError, subprocess.CalledProcessError):
        return None


def check_output(path: Path) -> None:
    """Only a file this script wrote may be replaced."""
    if not path.exists():
        return
    try:
        _, meta = load_tensors(path, "weights")
    except ReirError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SystemExit(f"error: {path} exists and was not written by benchmarks/pretrain.py; "
                         "choose another --output or remove it")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="the state dict (.safetensors); the record "
                                                                   "goes beside it as <output>.json")
    parser.add_argument("--font_dir", type=Path, action="append", default=None,
                        help=f"a folder of source fonts (repeatable; default {NOTO}, Debian's fonts-noto-core)")
    parser.add_argument("--classes", type=int, default=0, help="a seeded random choice of this many classes "
                                                               "(0 = every class)")
    parser.add_argument("--draws", type=int, default=8, help="images of every class an epoch")
    parser.add_argument("--val_draws", type=int, default=2, help="validation images a class")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lookalike", type=float, default=0.95,
                        help="leave out characters this cosine-similar to a target character's rendering")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started, cpu_started = time.perf_counter(), time.process_time()
    check_output(args.output)
    font_dirs = args.font_dir or [NOTO]
    fonts = source_fonts(font_dirs)
    targets = target_classes()
    excluded = target_font_characters()
    drawn = source_characters(fonts, excluded)
    images = render_classes(drawn)
    references = reference_renderings(
        excluded, [f for f in fonts if f.name in REFERENCE_FONTS] + [font_folder() / n for n in TARGET_REFERENCE_FONTS])
    similar = lookalikes(images, references, args.lookalike)
    points = [p for p in images if p not in similar]
    if args.classes:
        order = np.random.default_rng(args.seed).permutation(len(points))[:args.classes]
        points = sorted(points[i] for i in order)
    if not points:
        raise SystemExit(f"error: the fonts in {', '.join(map(str, font_dirs))} draw no character the targets do "
                         "not use; install fonts-noto-core or pass other --font_dir folders")
    check_disjoint(points, targets)
    prepared = time.perf_counter() - started
    print(f"{len(points)} classes ({len(drawn)} characters mapped, {len(drawn) - len(images)} blank or duplicate, "
          f"{len(similar)} look-alikes left out) from {len(fonts)} fonts in {prepared:.0f} s", flush=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    renderings = [torch.as_tensor(images[p]) for p in points]
    stacked = torch.cat(renderings).float() / 255
    mean, std = float(stacked.mean()), float(stacked.std())
    val_generator = torch.Generator().manual_seed(args.seed + 1)
    val_labels = torch.arange(len(points)).repeat_interleave(args.val_draws)
    val_images = torch.cat([draw(renderings, chunk, val_generator) for chunk in val_labels.split(4096)])

    device = torch.device(args.device)
    model = torchvision.models.resnet18(num_classes=len(points)).to(device, memory_format=torch.channels_last)
    optimizer, scheduler = SCRATCH.optimizer(model.parameters(), args.epochs)
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.arange(len(points)).repeat(args.draws)[torch.randperm(len(points) * args.draws,
                                                                              generator=generator)]
        total_loss = total_correct = 0.0
        epoch_started = time.perf_counter()
        for batch in order.split(BATCH_SIZE):
            inputs = normalise(draw(renderings, batch, generator), mean, std).to(device)
            targets_batch = batch.to(device)
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            total_correct += int((logits.argmax(1) == targets_batch).sum())
        scheduler.step()
        top1, top5 = evaluate(model, val_images, val_labels, mean, std, device)
        history.append({"epoch": epoch, "train_loss": total_loss / len(order),
                        "train_accuracy": total_correct / len(order), "val_top1": top1, "val_top5": top5,
                        "seconds": time.perf_counter() - epoch_started})
        print(f"epoch {epoch}/{args.epochs}: loss {history[-1]['train_loss']:.3f}, train top-1 "
              f"{100 * history[-1]['train_accuracy']:.1f} %, validation top-1 {100 * top1:.1f} % top-5 "
              f"{100 * top5:.1f} % ({history[-1]['seconds']:.0f} s)", flush=True)

    scripts: dict[str, int] = {}
    for point in points:
        script = fontTools.unicodedata.script_name(fontTools.unicodedata.script(chr(point)))
        scripts[script] = scripts.get(script, 0) + 1
    record = {
        "format": FORMAT,
        "command": "python benchmarks/pretrain.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": "torchvision resnet18", "image_size": IMAGE_SIZE,
        "source": {"fonts": len(fonts), "font_dirs": [str(d) for d in font_dirs],
                   "packages": {name: package_version(name) for name in ("fonts-noto-core",)},
                   "characters_mapped": len(drawn), "blank_or_duplicate": len(drawn) - len(images),
                   "lookalikes_left_out": {class_name(p): round(s, 3) for p, s in sorted(similar.items())},
                   "lookalike_threshold": args.lookalike},
        "scripts": dict(sorted(scripts.items(), key=lambda item: -item[1])),
        "disjoint_from": {**{name: f"{len(classes)} characters checked" for name, classes in targets.items()},
                          "fashion-mnist": "garment classes, no characters"},
        "classes": len(points), "class_names": [class_name(p) for p in points],
        "images": {"renderings": int(sum(len(r) for r in renderings)), "train_per_epoch": len(points) * args.draws,
                   "validation": len(val_images)},
        "normalisation": {"mean": mean, "std": std},
        "epochs": args.epochs, "recipe": {"name": SCRATCH.name, "learning_rate": SCRATCH.learning_rate,
                                          "weight_decay": SCRATCH.weight_decay, "batch_size": BATCH_SIZE},
        "accuracy": {"validation_top1": history[-1]["val_top1"], "validation_top5": history[-1]["val_top5"],
                     "train_top1_last_epoch": history[-1]["train_accuracy"]},
        "history": history, "device": str(device), "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
        "seconds_preparing": prepared,
    }
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_files(args.output) as staged:
        save_tensors(staged, state, record)
        digest = hashlib.sha256(staged.read_bytes()).hexdigest()
        companion = staged.with_name(staged.name + ".json")
        companion.write_text(json.dumps({**record, "weights_sha256": digest}, indent=1) + "\n")
    print(f"wrote {args.output} (SHA-256 {digest[:16]}...) and {args.output}.json: {len(points)} classes, "
          f"{args.epochs} epochs, validation top-1 {100 * history[-1]['val_top1']:.1f} %, "
          f"{record['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
