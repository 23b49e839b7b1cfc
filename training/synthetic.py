"""The built-in `synthetic` stream: procedural multi-modality phantoms with known findings and varied reports.

Six modalities (X-ray, CT, MRI, ultrasound, pathology, fundus), each drawn with numpy from a seed. Every phantom
has one finding of known location and size, and a report that states the modality (in varied wording), the
finding, its size and its location. Ground truth is kept in columns: `modality`, `finding`, `location` and
`finding_box` ([x0, y0, x1, y1] as fractions of the image), so evaluation can measure routing and word-region
localisation. The stream is a `datasets.IterableDataset` with several shards, each seeded from the stream seed,
so the same seed always gives the same rows, and another seed gives a held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image

from modeling_medmoe.configuration_medmoe import DEFAULT_EXPERT_NAMES

# What the card of a model trained on this stream alone says (model_card/generate.py), and medmoe-classify looks for.
SYNTHETIC_NOTE = (
    "**Demonstration model.** It was pretrained on the built-in `synthetic` stream of procedural phantoms, so it "
    "shows the pipeline end to end but knows nothing about real medical images."
)

MODALITIES = DEFAULT_EXPERT_NAMES  # one phantom kind per default expert
TRAIN_SEED = 0
EVAL_SEED = 1_000_003  # the held-out phantoms; any seed other than the training one works

# Patient-side anatomy: on X-ray, CT and MRI the patient's right is on the image's left.
RADIOLOGY = ("X-ray", "CT", "MRI")

MODALITY_PHRASES = {
    "X-ray": ["Chest radiograph", "Frontal chest X-ray", "CXR", "PA chest radiograph", "Portable chest X-ray"],
    "CT": ["Axial CT", "Contrast-enhanced CT", "CT scan", "Computed tomography", "Non-contrast CT"],
    "MRI": ["Axial T2-weighted MRI", "Brain MRI", "FLAIR MR image", "MRI of the brain", "T1-weighted MRI"],
    "ultrasound": ["Ultrasound", "Sonography", "Grayscale ultrasound", "Transabdominal sonogram", "Ultrasound image"],
    "pathology": ["H&E-stained section", "Histology slide (H&E)", "Histopathology", "H&E tile", "Photomicrograph, H&E"],
    "fundus": ["Fundus photograph", "Colour fundus photo", "Retinal photograph", "Fundus image", "Fundoscopy image"],
}
FINDINGS = {
    "X-ray": ["nodule", "opacity", "mass", "consolidation"],
    "CT": ["hypodense lesion", "hyperdense lesion", "cyst", "mass"],
    "MRI": ["hyperintense lesion", "enhancing mass", "bright focus", "T2 hyperintense focus"],
    "ultrasound": ["hypoechoic mass", "anechoic cyst", "hypoechoic nodule", "dark solid lesion"],
    "pathology": ["cluster of atypical nuclei", "dense lymphocytic focus", "crowded gland", "nest of tumour cells"],
    "fundus": ["haemorrhage", "hard exudates", "cotton wool spot", "dark red blot"],
}
TEMPLATES = [
    "{modality} shows a {size} {finding} in the {location}.",
    "{modality}: {size} {finding}, {location}.",
    "There is a {size} {finding} in the {location} on this {modality_lower}.",
    "{modality} demonstrates a {finding} measuring {millimetres} mm in the {location}.",
    "Findings: {size} {finding} in the {location}. Study: {modality}.",
]
VERTICAL_WORDS = {
    "X-ray": ("upper zone", "mid zone", "lower zone"),
    "CT": ("anterior abdomen", "mid abdomen", "posterior abdomen"),
    "MRI": ("frontal lobe", "parietal lobe", "occipital lobe"),
    "ultrasound": ("near field", "mid field", "far field"),
    "pathology": ("upper field", "middle field", "lower field"),
    "fundus": ("superior retina", "central retina", "inferior retina"),
}


@dataclass
class Finding:
    """A round finding: centre and radius in [-1, 1] image coordinates (x right, y down)."""

    x: float
    y: float
    radius: float

    def box(self) -> list[float]:
        """[x0, y0, x1, y1] as fractions of the image width and height."""
        return [
            float(np.clip((self.x - self.radius + 1) / 2, 0, 1)),
            float(np.clip((self.y - self.radius + 1) / 2, 0, 1)),
            float(np.clip((self.x + self.radius + 1) / 2, 0, 1)),
            float(np.clip((self.y + self.radius + 1) / 2, 0, 1)),
        ]


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y coordinates of pixel centres in [-1, 1], each [size, size]."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(axis, axis)


def ellipse(x, y, centre_x, centre_y, radius_x, radius_y) -> np.ndarray:
    return ((x - centre_x) / radius_x) ** 2 + ((y - centre_y) / radius_y) ** 2 < 1


def blob(x, y, finding: Finding) -> np.ndarray:
    """A soft disk of the finding's size: 1 inside, falling to 0 at the edge."""
    distance = np.sqrt((x - finding.x) ** 2 + (y - finding.y) ** 2) / finding.radius
    return np.clip(1.5 - distance * 1.5, 0, 1) ** 0.5


def dots(x, y, centres: np.ndarray, radius: float) -> np.ndarray:
    """1 within `radius` of any of `centres` [n, 2], else 0; each dot touches only its own window of pixels."""
    size = x.shape[0]
    mask = np.zeros(x.shape, dtype=np.float32)
    reach = int(np.ceil(radius * size / 2)) + 1
    for centre_x, centre_y in centres:
        row, column = int((centre_y + 1) / 2 * size), int((centre_x + 1) / 2 * size)
        rows = slice(max(row - reach, 0), max(min(row + reach + 1, size), 0))
        columns = slice(max(column - reach, 0), max(min(column + reach + 1, size), 0))
        inside = (x[rows, columns] - centre_x) ** 2 + (y[rows, columns] - centre_y) ** 2 < radius**2
        mask[rows, columns] = np.maximum(mask[rows, columns], inside)
    return mask


def draw_xray(x, y, rng, finding_radius):
    image = np.full_like(x, 0.08)
    body = ellipse(x, y, 0, 0.05, 0.85, 0.95)
    image[body] = 0.45
    lungs = ellipse(x, y, -0.38, -0.05, 0.27, 0.55) | ellipse(x, y, 0.38, -0.05, 0.27, 0.55)
    image[lungs] = 0.18
    image += lungs * 0.07 * (np.sin(y * 26 + np.abs(x) * 5) > 0.6)
    image[ellipse(x, y, 0.12, 0.3, 0.24, 0.2)] = 0.55
    image[(np.abs(x) < 0.06) & body] = 0.75
    side = rng.choice([-1, 1])
    finding = Finding(side * 0.38 + rng.uniform(-0.1, 0.1), rng.uniform(-0.45, 0.3), finding_radius)
    image += 0.45 * blob(x, y, finding)
    return image, finding


def draw_ct(x, y, rng, finding_radius):
    image = np.zeros_like(x)
    image[ellipse(x, y, 0, 0, 0.88, 0.66)] = 0.25
    image[ellipse(x, y, 0, 0, 0.8, 0.58)] = 0.38
    image[ellipse(x, y, -0.35, -0.08, 0.34, 0.3)] = 0.46
    image[ellipse(x, y, 0.36, 0.25, 0.1, 0.14) | ellipse(x, y, -0.36, 0.3, 0.1, 0.14)] = 0.52
    image[ellipse(x, y, 0, 0.42, 0.11, 0.1)] = 0.95
    gas = rng.uniform([-0.3, -0.3], [0.4, 0.2], size=(4, 2))
    image[dots(x, y, gas, 0.05) > 0] = 0.02
    finding = Finding(rng.uniform(-0.5, 0.5), rng.uniform(-0.35, 0.25), finding_radius)
    image += rng.choice([-0.25, 0.3]) * blob(x, y, finding)
    return image, finding


def draw_mri(x, y, rng, finding_radius):
    image = np.zeros_like(x)
    image[ellipse(x, y, 0, 0, 0.78, 0.94)] = 0.6
    image[ellipse(x, y, 0, 0, 0.72, 0.88)] = 0.12
    brain = ellipse(x, y, 0, 0, 0.66, 0.82)
    angle = np.arctan2(y, x)
    image[brain] = (0.45 + 0.07 * np.sin(9 * angle + 14 * np.sqrt(x**2 + y**2)))[brain]
    image[ellipse(x, y, -0.12, -0.05, 0.07, 0.2) | ellipse(x, y, 0.12, -0.05, 0.07, 0.2)] = 0.9
    finding = Finding(rng.choice([-1, 1]) * rng.uniform(0.25, 0.45), rng.uniform(-0.55, 0.55), finding_radius)
    image += 0.5 * blob(x, y, finding)
    return image, finding


def draw_ultrasound(x, y, rng, finding_radius):
    depth = np.sqrt(x**2 + (y + 1.05) ** 2)
    fan = (np.abs(np.arctan2(x, y + 1.05)) < 0.62) & (depth > 0.25) & (depth < 1.95)
    speckle = rng.rayleigh(0.35, size=x.shape).astype(np.float32)
    image = np.where(fan, speckle * (1.1 - 0.4 * depth / 1.95), 0.0)
    image += fan * 0.15 * (np.sin(depth * 18) > 0.8)
    finding = Finding(rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.6), finding_radius)
    shadow = blob(x, y, finding)
    enhancement = fan * (np.abs(x - finding.x) < finding.radius) * (y > finding.y + finding.radius) * 0.15
    image = image * (1 - 0.85 * shadow) + enhancement
    return image, finding


def draw_pathology(x, y, rng, finding_radius):
    eosin = 0.05 * np.sin(x * 7 + rng.uniform(0, 6)) * np.sin(y * 5)
    image = np.stack([0.93 + eosin, 0.72 + eosin, 0.84 + eosin], axis=-1)
    nuclei = dots(x, y, rng.uniform(-1, 1, size=(70, 2)), 0.035)
    finding = Finding(rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), finding_radius)
    cluster = rng.normal([finding.x, finding.y], finding.radius / 2.2, size=(int(300 * finding.radius), 2))
    dense = dots(x, y, cluster, 0.03)
    for channel, (nucleus, dark) in enumerate(zip((0.45, 0.25, 0.62), (0.28, 0.08, 0.42))):
        image[..., channel] = np.where(nuclei > 0, nucleus, image[..., channel])
        image[..., channel] = np.where(dense > 0, dark, image[..., channel])
    return image, finding


def draw_fundus(x, y, rng, finding_radius):
    radius = np.sqrt(x**2 + y**2)
    retina = radius < 0.92
    shade = np.clip(1.05 - 0.5 * radius**2, 0, 1)
    image = np.stack([0.82 * shade, 0.36 * shade, 0.14 * shade], axis=-1) * retina[..., None]
    disc_x = rng.choice([-0.45, 0.45])
    vessels = np.zeros_like(x, dtype=bool)
    for curvature in (-1.0, -0.55, 0.55, 1.0):  # arcades leaving the optic disc upwards and downwards
        vessels |= (np.abs(y - curvature * (x - disc_x) ** 2) < 0.018) & retina
    image[vessels] = (0.5, 0.08, 0.05)
    image[ellipse(x, y, disc_x, 0, 0.13, 0.15)] = (0.96, 0.86, 0.56)
    image[ellipse(x, y, -disc_x * 0.2, 0, 0.1, 0.1)] *= 0.7
    finding = Finding(rng.uniform(-0.55, 0.55), rng.uniform(-0.55, 0.55), finding_radius)
    colour = np.array([(0.45, 0.02, 0.02), (0.98, 0.9, 0.35), (0.95, 0.95, 0.9), (0.35, 0.02, 0.05)][rng.integers(4)])
    weight = blob(x, y, finding)[..., None] * retina[..., None]
    image = image * (1 - weight) + colour * weight
    return image, finding


DRAW = {
    "X-ray": draw_xray,
    "CT": draw_ct,
    "MRI": draw_mri,
    "ultrasound": draw_ultrasound,
    "pathology": draw_pathology,
    "fundus": draw_fundus,
}


def location_words(modality: str, finding: Finding) -> str:
    """Where the finding is, in the words a report of this modality would use."""
    thirds = int(np.clip((finding.y + 1) / 2 * 3, 0, 2))
    vertical = VERTICAL_WORDS[modality][thirds]
    if modality in RADIOLOGY:
        side = "right" if finding.x < 0 else "left"  # the patient's side
    else:
        side = "left" if finding.x < 0 else "right"  # the image's side
    return f"{side} {vertical}"


def write_report(modality: str, finding_name: str, finding: Finding, rng: np.random.Generator) -> str:
    size = "small" if finding.radius < 0.1 else "large" if finding.radius > 0.14 else "moderate"
    phrase = MODALITY_PHRASES[modality][rng.integers(len(MODALITY_PHRASES[modality]))]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    report = template.format(
        modality=phrase,
        modality_lower=phrase[0].lower() + phrase[1:] if not phrase[:3].isupper() else phrase,
        size=size,
        finding=finding_name,
        location=location_words(modality, finding),
        millimetres=int(round(finding.radius * 180)),
    )
    return report[0].upper() + report[1:]


def make_phantom(rng: np.random.Generator, image_size: int = 128, modality: str | None = None) -> dict:
    """One row of the stream: image (PIL), text, modality, finding, location and finding_box."""
    modality = modality or MODALITIES[rng.integers(len(MODALITIES))]
    x, y = grid(image_size)
    image, finding = DRAW[modality](x, y, rng, float(rng.uniform(0.07, 0.17)))
    image = image + rng.normal(0, 0.02, size=image.shape)
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    finding_name = FINDINGS[modality][rng.integers(len(FINDINGS[modality]))]
    return {
        "image": Image.fromarray(pixels),
        "text": write_report(modality, finding_name, finding, rng),
        "modality": modality,
        "finding": finding_name,
        "location": location_words(modality, finding),
        "finding_box": finding.box(),
    }


def generate_phantoms(shard_seeds: list[int], rows_per_shard: int, image_size: int):
    """Generator for `IterableDataset.from_generator`: each seed in `shard_seeds` is one shard."""
    for shard_seed in shard_seeds:
        rng = np.random.default_rng(shard_seed)
        for _ in range(rows_per_shard):
            yield make_phantom(rng, image_size)


FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "modality": datasets.Value("string"),
        "finding": datasets.Value("string"),
        "location": datasets.Value("string"),
        "finding_box": datasets.Sequence(datasets.Value("float32"), length=4),
    }
)


def synthetic_stream(
    seed: int = TRAIN_SEED, num_shards: int = 8, rows_per_shard: int = 1000, image_size: int = 128
) -> datasets.IterableDataset:
    """The phantom stream: `num_shards` shards of `rows_per_shard` rows, deterministic for a seed."""
    shard_seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(num_shards)]
    return datasets.IterableDataset.from_generator(
        generate_phantoms,
        features=FEATURES,
        gen_kwargs={"shard_seeds": shard_seeds, "rows_per_shard": rows_per_shard, "image_size": image_size},
    )
