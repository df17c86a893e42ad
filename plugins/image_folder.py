"""Image folders: the ImageNet-val ``ImageFolder`` layout, or a flat folder of ``<wnid>_<name>.JPEG``.

Class indices follow the ImageNet convention of torchvision and timm models: a wnid's position in
the sorted list of the 1,000 ImageNet-1k wnids (shipped with timm). Folders whose names are not
wnids fall back to their sorted position, as ``torchvision.datasets.ImageFolder`` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lesionbench.data import RawDataset
from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl

WNID = re.compile(r"^(n\d{8})")


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k wnids in class-index order (n01440764 … n15075141)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def _is_image(path: Path) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS  # here: `lesionbench list` stays light

    return path.suffix.lower() in IMG_EXTENSIONS


class ImageFolderSource:
    name = "image_folder"
    description = "ImageNet-style images: class sub-folders (ImageNet val) or flat <wnid>_<name>.JPEG files."
    default_path = None

    def class_names_for(self, num_classes: int) -> list[str] | None:
        """ImageNet-1k's descriptions ("tench, Tinca tinca", …) for 1,000-class results, whose labels
        follow the wnid order (see the module docstring); None otherwise (folder names are not
        recorded in results)."""
        if num_classes != 1000:
            return None
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]

    def load(self, path: str | None, split: str = "val") -> RawDataset:
        from torchvision.datasets.folder import ImageFolder, default_loader

        if not path:
            raise LesionbenchError("dataset image_folder needs a path: pass --data DIR or set dataset.path")
        root = Path(path)
        if not root.is_dir():
            raise LesionbenchError(f"image folder {str(root)!r} does not exist")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        wnids = imagenet_wnids()
        position = {w: i for i, w in enumerate(wnids)}
        if subdirs:
            folder = ImageFolder(str(root), allow_empty=True)
            if all(name in position for name in folder.classes):
                remap = [position[name] for name in folder.classes]
                labels = [remap[t] for _, t in folder.samples]
                num_classes, names = len(wnids), wnids
            else:
                labels = [t for _, t in folder.samples]
                num_classes, names = len(folder.classes), list(folder.classes)
            files = [p for p, _ in folder.samples]
        else:
            files, labels = [], []
            for p in sorted(root.iterdir()):
                m = WNID.match(p.name)
                if _is_image(p) and m and m.group(1) in position:
                    files.append(str(p))
                    labels.append(position[m.group(1)])
            num_classes, names = len(wnids), wnids
        if not files:
            raise LesionbenchError(
                f"no images found in {str(root)!r} (expected class sub-folders or <wnid>_<name>.JPEG files)"
            )
        return RawDataset(
            name=self.name,
            path=str(root),
            labels=np.asarray(labels, dtype=np.int64),
            num_classes=num_classes,
            decode=lambda i: default_loader(files[i]),
            class_names=list(names),
        )


@hookimpl
def lesionbench_datasets():
    return [ImageFolderSource()]
