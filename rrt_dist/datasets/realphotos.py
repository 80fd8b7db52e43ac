"""Real photographs with natural positives: several camera views of the same places and objects, taken from the
snapshots of public GitHub repositories that ship them as sample data, plus other photographs as distractors.

Unlike ``rrt_dist.datasets.photos`` (warped views of single photographs), every positive here is another photo
taken by a camera from another place, at another time or with another camera. The ground truth is stated below,
per place, with why its images show the same place or object: the datasets they come from say so (structure-
from-motion scenes with ground-truth cameras, image-matching sample pairs with ground-truth poses).

The images are not in this repository (their licences vary, see ``SOURCES``; and size): :func:`write_real_photos`
rebuilds the benchmark from local git copies of the repositories (``git clone``, or mirrors), reading each file
at the commit pinned in ``SOURCES`` (``git --git-dir=<repo> show <commit>:<path>``), so every rebuild writes the
same pixels. Written in the ``folder`` layout (``dataset=folder dataset.root=<root>``)::

    <root>/images/<place>/<name>.jpg     every image, longest side <= 640 px (EXIF orientation applied)
    <root>/gallery.csv                   path                       (no labels: training never sees them)
    <root>/queries.csv                   path,positives             test queries (not in the gallery)
    <root>/queries_val.csv               path,positives             validation queries (choose recipes here)
    <root>/meta.json                     sources, commits, each image's place, origin and split

Queries are held out of the gallery, so a reranker trained on the gallery's own images (self-supervised or taught
by geometric verification) never sees a query. Per place, ``queries`` of its images (a draw seeded by the place) are queries,
dealt test, validation, test, ... in the drawn order; places with two images give one query each, dealt to test
and validation 2:1 in a seeded order. A query's positives are every gallery image of its place.
"""
from __future__ import annotations

import io
import json
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# repository -> (pinned commit, licence of the images as their repository or dataset states it)
SOURCES = {
    "openMVG/SfM_quality_evaluation": (
        "348a981ef51112e9848acfb20004f4ed6fbc6ce3",
        "Strecha et al., 'On Benchmarking Camera Calibration and Multi-View Stereo for High Resolution Imagery', "
        "CVPR 2008 (EPFL multi-view data, research use); openMVG's copy with ground-truth cameras"),
    "openMVG/ImageDataset_SceauxCastle": (
        "fde7f5faba555e3c54700477c304488613346a19", "Copyright 2012 Pierre Moulon, openMVG's sample images"),
    "cvg/Hierarchical-Localization": (
        "c13273bd0ecc2917a35910fd843712a1c6243193",
        "YFCC100M (Flickr Creative Commons) photos via the Image Matching Challenge 2021; repository Apache-2.0"),
    "cvg/LightGlue": ("1fd587b6f5a7a0befd31188f1e5d2f05740006d7", "repository Apache-2.0 (sample images)"),
    "Parskatt/RoMa": ("a1494f87ab85485ad8a92a981876ca837e2334e4", "repository MIT (sample images)"),
    "magicleap/SuperGluePretrainedNetwork": (
        "ddcf11f42e7e0732a0c4607648f9448ea8d73590",
        "Magic Leap's non-commercial research licence; the photos: YFCC100M (Creative Commons) Phototourism, "
        "ScanNet (its terms of use), TUM RGB-D (CC BY 4.0)"),
    "alicevision/dataset_monstree": ("c697b936be47d6b78ce58d7eb4188e6908503ee2", "AliceVision sample dataset"),
    "alicevision/dataset_buddha": ("9067f679eb5a772c3e818b7a12dc35882c071858", "CC BY 4.0 (Gasparini et al. 2017)"),
}

STRECHA = "Benchmarking_Camera_Calibration_2008"
PHOTOTOURISM = "assets/phototourism_sample_images"
SCANNET = "assets/scannet_sample_images"


@dataclass(frozen=True)
class Place:
    name: str
    why: str                           # the ground truth: why these images show one place or object
    images: tuple[tuple[str, str], ...]  # (repository, path at its pinned commit)
    queries: int = 1                   # how many of its images are queries (held out of the gallery)


def _files(repo: str, paths) -> tuple[tuple[str, str], ...]:
    return tuple((repo, p) for p in paths)


def _strecha(scene: str, frames) -> tuple[tuple[str, str], ...]:
    return _files("openMVG/SfM_quality_evaluation", (f"{STRECHA}/{scene}/images/{i:04d}.jpg" for i in frames))


# Every third or second frame of the long sequences: views a few metres or degrees apart, not near-duplicates.
PLACES = (
    Place("herz_jesu", "the portal facade of the Herz-Jesu church: Strecha's Herz-Jesu-P25 and -P8 scenes, two "
          "camera sweeps along the same facade (one SfM ground truth each)",
          _strecha("Herz-Jesus-P25", range(0, 25, 3)) + _strecha("Herz-Jesus-P8", range(0, 8, 2)), queries=3),
    Place("ettlingen_castle", "the inner courtyard of Ettlingen castle: Strecha's castle-P30 and castle-P19 sweeps "
          "around it and entry-P10, the courtyard's entrance portal, which castle-P30's last frames also show "
          "(castle-P19's even frames are files of castle-P30 and are left out)",
          _strecha("castle-P30", range(0, 30, 3)) + _strecha("castle-P19", range(1, 19, 4))
          + _strecha("entry-P10", range(0, 10, 2)), queries=4),
    Place("fountain", "a sandstone wall fountain: Strecha's fountain-P11 sweep, its first seven frames (frames 8-10 "
          "also show Ettlingen castle's entrance portal, the place above)", _strecha("fountain-P11", range(7)),
          queries=2),
    Place("sceaux_castle", "the Chateau de Sceaux's garden facade: openMVG's SfM sample, one photographer walking "
          "along it", _files("openMVG/ImageDataset_SceauxCastle", (f"images/100_{i}.JPG" for i in range(7100, 7111))),
          queries=2),
    Place("sacre_coeur", "the Sacre-Coeur basilica, Paris, in Flickr photos by different people, day and night: "
          "hloc's mapping set, LightGlue's and RoMa's matching examples",
          _files("cvg/Hierarchical-Localization", (f"datasets/sacre_coeur/mapping/{n}.jpg" for n in (
              "02928139_3448003521", "03903474_1471484089", "10265353_3838484249", "17295357_9106075285",
              "32809961_8274055477", "44120379_8371960244", "51091044_3486849416", "60584745_2207571072",
              "71295362_4051449754", "93341989_396310999")))
          + _files("cvg/LightGlue", ("assets/sacre_coeur1.jpg", "assets/sacre_coeur2.jpg"))
          + _files("Parskatt/RoMa", ("assets/sacre_coeur_A.jpg", "assets/sacre_coeur_B.jpg")), queries=3),
    Place("monstree", "a face-like burl on one tree trunk: AliceVision's monstree photogrammetry set (the files its "
          "snapshot holds, every second one)",
          _files("alicevision/dataset_monstree", (f"full/IMG_{i}.JPG" for i in (
              1025, 1028, 1036, 1037, 1040, 1042, 1046, 1048, 1050, 1053, 1056, 1062))), queries=3),
    Place("buddha", "one stone Buddha head on a table, photographed all around: AliceVision's buddha "
          "photogrammetry set with its cameras (the files its snapshot holds)",
          _files("alicevision/dataset_buddha", (f"buddha/{i:05d}._c.png" for i in (
              6, 7, 10, 18, 28, 42, 46, 47, 49, 52, 55, 60, 65))), queries=3),
    Place("tum_desk", "one office desk with a globe: a TUM RGB-D freiburg sequence of a camera moving around it "
          "(every second frame)",
          _files("magicleap/SuperGluePretrainedNetwork", (f"assets/freiburg_sequence/{t}.png" for t in (
              "1341847980.722988", "1341847982.730674", "1341847984.743352", "1341847986.762616",
              "1341847988.769740", "1341847990.810771", "1341847992.818723", "1341847994.866828",
              "1341847996.874766"))), queries=2),
    Place("tower_bridge", "Tower Bridge, London (Phototourism's london_bridge scene: pairs with ground-truth poses)",
          _files("magicleap/SuperGluePretrainedNetwork", (f"{PHOTOTOURISM}/london_bridge_{n}.jpg" for n in (
              "19481797_2295892421", "49190386_5209386933", "78916675_4568141288", "94185272_3874562886")))),
    Place("san_marco", "the Doge's Palace on Piazza San Marco, Venice (Phototourism's piazza_san_marco scene: "
          "pairs with ground-truth poses)",
          _files("magicleap/SuperGluePretrainedNetwork", (f"{PHOTOTOURISM}/piazza_san_marco_{n}.jpg" for n in (
              "06795901_3725050516", "15148634_5228701572", "18627786_5929294590", "43351518_2659980686",
              "58751010_4849458397")))),
    Place("st_pauls", "St Paul's Cathedral, London (Phototourism: a pair with its ground-truth pose)",
          _files("magicleap/SuperGluePretrainedNetwork", (f"{PHOTOTOURISM}/st_pauls_cathedral_{n}.jpg" for n in (
              "30776973_2635313996", "37347628_10902811376")))),
    Place("us_capitol", "the United States Capitol (Phototourism's scene)",
          _files("magicleap/SuperGluePretrainedNetwork", (f"{PHOTOTOURISM}/united_states_capitol_{n}.jpg" for n in (
              "26757027_6717084061", "98169888_3347710852")))),
    Place("toronto", "University College, Toronto, near and from across its lawn (RoMa's matching example)",
          _files("Parskatt/RoMa", ("assets/toronto_A.jpg", "assets/toronto_B.jpg"))),
    Place("lightglue_facade", "one building's facade, two photos (LightGlue's matching example)",
          _files("cvg/LightGlue", ("assets/DSC_0410.JPG", "assets/DSC_0411.JPG"))),
    # ScanNet: two frames of one room scan each, the pairs SuperGlue evaluates indoor pose estimation on (their
    # undistortion's black border is cropped: GV verified it between frames of every scan)
    *(Place(f"scannet_{scene}", f"ScanNet scene {scene}: two frames of one scan of one room (SuperGlue's indoor "
            f"pairs with ground-truth poses)",
            _files("magicleap/SuperGluePretrainedNetwork", (f"{SCANNET}/scene{scene}_00_frame-{f}.jpg" for f in frames)))
      for scene, frames in (
          ("0711", ("001680", "001995")), ("0713", ("001320", "002025")), ("0721", ("000375", "002745")),
          ("0722", ("000045", "000735")), ("0726", ("000135", "000210")), ("0737", ("000930", "001095")),
          ("0738", ("000885", "001065")), ("0743", ("000000", "001275")), ("0744", ("000585", "002310")),
          ("0747", ("000000", "001530")), ("0752", ("000075", "001440")), ("0755", ("000120", "002055")),
          ("0758", ("000165", "000510")), ("0768", ("001095", "003435")), ("0806", ("000225", "001095")))),
)
# Distractors: the photographs scikit-image and matplotlib ship (rrt_dist.datasets.photos), none of a place above.
MAX_SIZE = 640         # longest side: the self-supervised views' size, and extraction at 2 CPUs stays minutes
JPEG_QUALITY = 95
SCANNET_BORDER = 10    # pixels cropped on each side of a ScanNet frame (640 x 480)
FORMAT = 3      # of what write_real_photos writes: bump when it changes


def git_dir(mirrors: Path, repo: str) -> Path:
    """The local git copy of ``repo`` under ``mirrors``: ``<owner>+<name>/repo`` (mirrors), ``<owner>/<name>`` or
    ``<name>`` (clones, their ``.git``)."""
    owner, name = repo.split("/")
    for candidate in (mirrors / f"{owner}+{name}" / "repo", mirrors / owner / name / ".git", mirrors / name / ".git",
                      mirrors / owner / name, mirrors / name):
        if (candidate / "HEAD").is_file():
            return candidate
    raise FileNotFoundError(f"no git copy of {repo} under {mirrors} (git clone https://github.com/{repo} "
                            f"{mirrors / owner / name})")


def read_blob(mirrors: Path, repo: str, path: str) -> bytes:
    commit = SOURCES[repo][0]
    done = subprocess.run(["git", f"--git-dir={git_dir(mirrors, repo)}", "show", f"{commit}:{path}"],
                          capture_output=True)
    if done.returncode:
        raise FileNotFoundError(f"{repo}@{commit[:10]}:{path}: {done.stderr.decode().strip() or 'not readable'} "
                                "(a shallow or partial copy may lack the commit or the file's object)")
    return done.stdout


GENERIC_DIRS = ("images", "assets", "full", "mapping", "phototourism_sample_images", "scannet_sample_images",
                "freiburg_sequence")


def image_name(path: str) -> str:
    """A file name for a source path, unique within its place (Strecha's scenes all number their frames 0000...)."""
    parts = [p for p in Path(path).with_suffix("").parts[-3:] if p not in GENERIC_DIRS]
    return "_".join(parts).replace(".", "_")


def _save(rgb: np.ndarray, path: Path) -> None:
    """Write ``rgb`` (longest side at most ``MAX_SIZE``) as JPEG, unless ``path`` holds those bytes already: an
    unchanged image keeps its file (and its modification time, so its extracted features stay valid)."""
    from PIL import Image

    image = Image.fromarray(rgb)
    scale = MAX_SIZE / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=JPEG_QUALITY)
    if path.is_file() and path.read_bytes() == encoded.getvalue():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.getvalue())


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def split_queries(places=PLACES, seed: int = 0) -> dict[str, dict[str, str]]:
    """Each place's image paths -> ``test`` | ``val`` (queries) | ``gallery``, by the rule in the module's docstring."""
    pairs = [p.name for p in places if len(p.images) == 2]
    order = np.random.default_rng(seed).permutation(len(pairs))
    pair_role = {pairs[i]: "val" if n % 3 == 2 else "test" for n, i in enumerate(order)}
    out: dict[str, dict[str, str]] = {}
    for place in places:
        names = [path for _, path in place.images]
        roles = dict.fromkeys(names, "gallery")
        drawn = np.random.default_rng([seed, zlib.crc32(place.name.encode())]).permutation(len(names))
        for n, i in enumerate(drawn[:place.queries]):          # each place its own draw: one edit moves no other
            roles[names[i]] = pair_role.get(place.name, "test" if n % 2 == 0 else "val")
        out[place.name] = roles
    return out


def write_real_photos(root: str | Path, mirrors: str | Path, seed: int = 0) -> dict:
    """Write the benchmark under ``root`` from the git copies under ``mirrors`` (idempotent: a complete benchmark
    of the same settings is left as it is); returns its description (``meta.json``)."""
    from .photos import shipped_photos

    root, mirrors = Path(root), Path(mirrors)
    settings = {"seed": seed, "format": FORMAT, "max_size": MAX_SIZE,
                "sources": {repo: commit for repo, (commit, _) in SOURCES.items()}}
    meta_path = root / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text())["settings"] == settings:
        return json.loads(meta_path.read_text())
    roles = split_queries(PLACES, seed)
    for place in PLACES:
        names = [image_name(path) for _, path in place.images]
        if len(set(names)) != len(names):
            raise ValueError(f"{place.name}: two images would get one file name")
    images, rows = root / "images", {"gallery": [], "test": [], "val": []}
    for place in PLACES:
        place_rows = {"gallery": [], "test": [], "val": []}
        for repo, path in place.images:
            name = f"images/{place.name}/{image_name(path)}.jpg"
            rgb = _decode(read_blob(mirrors, repo, path))
            if place.name.startswith("scannet_"):
                rgb = rgb[SCANNET_BORDER:-SCANNET_BORDER, SCANNET_BORDER:-SCANNET_BORDER]
            _save(rgb, root / name)
            place_rows[roles[place.name][path]].append({"path": name, "place": place.name, "repo": repo,
                                                       "source": path})
        for role in rows:
            rows[role] += place_rows[role]
    for name, rgb in shipped_photos().items():
        _save(rgb, images / "distractors" / f"{name}.jpg")
        rows["gallery"].append({"path": f"images/distractors/{name}.jpg", "place": None, "repo": "scikit-image / "
                                "matplotlib (installed packages)", "source": name})
    gallery_of: dict[str, list[str]] = {}
    for row in rows["gallery"]:
        if row["place"]:
            gallery_of.setdefault(row["place"], []).append(row["path"])
    pd.DataFrame({"path": [r["path"] for r in rows["gallery"]]}).to_csv(root / "gallery.csv", index=False)
    for role, file in (("test", "queries.csv"), ("val", "queries_val.csv")):
        pd.DataFrame({"path": [r["path"] for r in rows[role]],
                      "positives": [";".join(gallery_of[r["place"]]) for r in rows[role]]}).to_csv(root / file,
                                                                                                   index=False)
    meta = {"settings": settings, "licences": {repo: licence for repo, (_, licence) in SOURCES.items()},
            "places": {p.name: p.why for p in PLACES},
            "counts": {"gallery": len(rows["gallery"]), "test_queries": len(rows["test"]),
                       "val_queries": len(rows["val"]), "places": len(PLACES),
                       "distractors": sum(r["place"] is None for r in rows["gallery"])},
            "images": rows}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta
