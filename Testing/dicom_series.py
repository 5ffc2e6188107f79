"""A real DICOM CT series on disk (one file per slice) that SimpleITK/GDCM reads back, for the tests."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def write_dicom_series(array: np.ndarray, folder: Path, uid: str, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                       origin: Sequence[float] = (0.0, 0.0)) -> None:
    """One CT slice file per k-index of ``array`` (KJI); ``spacing`` x, y, z in mm; ``origin`` x, y of slice 0."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in enumerate(np.asarray(array).astype(np.int16)):
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing(tuple(float(s) for s in spacing[:2]))
        tags = {"0008|0060": "CT", "0010|0020": "P1", "0020|000d": "1.2.3", "0020|000e": uid,
                "0020|0013": str(k + 1), "0020|0032": f"{origin[0]:g}\\{origin[1]:g}\\{spacing[2] * k:g}",
                "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": f"{spacing[1]:g}\\{spacing[0]:g}",
                "0018|0050": f"{spacing[2]:g}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{uid}.{k + 1}"}
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{uid}_{k:03d}.dcm"))
        writer.Execute(image)
