"""Real photographs that ship inside installed packages: data that works offline.

Used by the quickstart and the tests. Colour photographs of everyday scenes only: the grey ones
would all be replicated to RGB by the conversion rule and teach little about colour restoration, and
scikit-image's scientific images (Hubble deep field, retina, IHC stain, colour chart) are mostly black
or flat; tiled, they made up more than half of the quickstart's training tiles and taught its restorer to
darken natural photos.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_SKIMAGE = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
            "motorcycle_right.png")


def photo_files() -> dict[str, Path]:
    """``{"package_file.ext": path}`` for the photos that the installed packages provide."""
    import matplotlib
    import skimage
    import sklearn

    found = {f"skimage_{name}": Path(skimage.__file__).parent / "data" / name for name in _SKIMAGE}
    for path in sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg")):
        found[f"sklearn_{path.name}"] = path
    found["matplotlib_grace_hopper.jpg"] = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {name: path for name, path in found.items() if path.is_file()}


def copy_photos(dest: str | Path) -> list[Path]:
    """Copy the package photos into ``dest`` (a plain folder the shard builder can read)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name, src in photo_files().items():
        target = dest / name
        if not target.exists():
            shutil.copyfile(src, target)
        copied.append(target)
    return copied
