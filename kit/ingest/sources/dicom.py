"""DICOM folders: pixels rendered with modality LUT + window; only allowlisted, non-identifying tags."""

from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kit.core.errors import KitError
from kit.ingest.records import Box, Record
from kit.ingest.sources.common import _atomic_write_bytes, _one_line, _pixel_box


# Keywords whose values identify a patient, a visit, staff or a site, or are free text that often
# carries such data. None of them is ever copied; tests use `phi_values` to prove it.
PHI_KEYWORDS: tuple[str, ...] = (
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers",
    "CountryOfResidence", "RegionOfResidence", "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService",
    "MedicalRecordLocator", "PatientReligiousPreference", "AdditionalPatientHistory", "PatientComments",
    "ResponsiblePerson", "ResponsibleOrganization", "MedicalAlerts", "Allergies", "PregnancyStatus",
    "PatientInsurancePlanCodeSequence",
    # staff and site
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OperatorsName",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "ContentCreatorName", "StationName",
    "DeviceSerialNumber", "DetectorID", "PlateID", "CassetteID", "GantryID",
    # dates and times
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate", "OverlayDate",
    "CurveDate", "AcquisitionDateTime", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
    "InstanceCreationTime", "OverlayTime", "CurveTime", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime",
    # identifiers
    "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "MediaStorageSOPInstanceUID", "FrameOfReferenceUID", "ReferencedSOPInstanceUID", "IrradiationEventUID",
    "RequestAttributesSequence", "PerformedProcedureStepID", "ScheduledProcedureStepID", "RequestedProcedureID",
    "AdmissionID", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialCoordinatingCenterName", "ClinicalTrialTimePointID", "ClinicalTrialSeriesID",
    # free text that often holds any of the above
    "StudyDescription", "SeriesDescription", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
    "ImageComments", "ContentDescription", "ContentLabel", "ProtocolName", "DerivationDescription",
    "ReasonForStudy", "RequestedProcedureComments", "ImagingServiceRequestComments",
)

_PHI_SET = frozenset(PHI_KEYWORDS)

# Only coded or numeric tags (VR CS/DS/IS/US): their values cannot carry a name or a sentence.
DICOM_METADATA_ALLOWLIST: tuple[str, ...] = (
    "Modality", "BodyPartExamined", "ViewPosition", "PatientPosition", "ImageType", "PhotometricInterpretation",
    "Rows", "Columns", "NumberOfFrames", "SliceThickness", "PixelSpacing", "ImageLaterality", "Laterality",
    "SegmentationType",
)
_SAFE_VRS = {"CS", "DS", "IS", "US", "UL", "SS"}

MODALITY_WORDS: dict[str, str] = {
    "CT": "computed tomography (CT) image",
    "MR": "magnetic resonance (MR) image",
    "NM": "nuclear medicine image",
    "US": "ultrasound image",
    "CR": "computed radiography image",
    "DX": "digital X-ray image",
    "MG": "mammography image",
    "PT": "positron emission tomography (PET) image",
    "XA": "X-ray angiography image",
    "RF": "fluoroscopy image",
    "SEG": "segmentation mask",
    "OT": "medical image",
    "SC": "secondary capture image",
    "IO": "intra-oral X-ray image",
    "PX": "panoramic dental X-ray image",
    "OP": "ophthalmic photograph",
    "ES": "endoscopy image",
    "SM": "slide microscopy image",
    "XC": "external camera photograph",
}
_BODY_PARTS: dict[str, str] = {
    "WHOLEBODY": "the whole body", "WHOLE BODY": "the whole body", "CSPINE": "the cervical spine",
    "TSPINE": "the thoracic spine", "LSPINE": "the lumbar spine", "HEADNECK": "the head and neck",
    "CHESTABDOMEN": "the chest and abdomen", "ABDOMENPELVIS": "the abdomen and pelvis",
    "CHEST_TO_PELVIS": "the chest to pelvis", "TMJ": "the temporomandibular joint",
    "EXTREMITY": "an extremity",
}
_VIEWS: dict[str, str] = {
    "PA": "posteroanterior (PA) view", "AP": "anteroposterior (AP) view", "LAT": "lateral view",
    "LL": "left lateral view", "RL": "right lateral view", "OBL": "oblique view", "CC": "craniocaudal (CC) view",
    "MLO": "mediolateral oblique (MLO) view", "ML": "mediolateral view", "LM": "lateromedial view",
}
_LATERALITY = {"L": "left side", "R": "right side", "B": "both sides"}
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")


def _is_multi(value: Any) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, (MultiValue, list, tuple))


def _walk_phi(ds: Any, inside: bool, out: list[str]) -> None:
    for el in ds:
        hit = inside or el.keyword in _PHI_SET
        if el.VR == "SQ":
            for item in el.value or []:
                _walk_phi(item, hit, out)
            continue
        if not hit or el.value is None or isinstance(el.value, (bytes, bytearray)):
            continue
        values = list(el.value) if _is_multi(el.value) else [el.value]  # PersonName iterates by character
        for v in values:
            s = str(v).strip()
            if s and s not in out:
                out.append(s)


def phi_values(path: Path) -> list[str]:
    """String values of every `PHI_KEYWORDS` tag in a DICOM file, nested sequences and file meta
    included; values inside a PHI sequence count too. Empty values are left out.

    Raises KitError when the file cannot be read as DICOM.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types for damaged files
        raise KitError(f"cannot read DICOM file {path}: {_one_line(e)}") from None
    return _dataset_phi(ds)


def _dataset_phi(ds: Any) -> list[str]:
    out: list[str] = []
    if getattr(ds, "file_meta", None) is not None:
        _walk_phi(ds.file_meta, False, out)
    _walk_phi(ds, False, out)
    return out


def _first(value: Any) -> Any:
    if value is None:
        return None
    if _is_multi(value):
        items = list(value)
        return items[0] if items else None
    return value


def _dicom_metadata(ds: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for kw in DICOM_METADATA_ALLOWLIST:
        if kw not in ds:  # top level only: nested items belong to other images or people
            continue
        el = ds.data_element(kw)
        if el is None or el.VR not in _SAFE_VRS or el.value is None or el.value == "":
            continue
        val = el.value
        if _is_multi(val):
            text = ", ".join(str(v).strip() for v in val if str(v).strip())
        else:
            text = str(val).strip()
        if text:
            out[kw] = text
    plane = _plane(ds)
    if plane:
        out["ImagePlane"] = plane
    return out


def _plane(ds: Any) -> str | None:
    """Axial/sagittal/coronal from the orientation cosines (numbers only), else from ImageType."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is not None and len(iop) == 6:
        try:
            row, col = np.array([float(v) for v in iop[:3]]), np.array([float(v) for v in iop[3:]])
            normal = np.abs(np.cross(row, col))
            if normal.max() > 0.8:  # oblique slices get no plane name rather than a wrong one
                return ("sagittal", "coronal", "axial")[int(normal.argmax())]
            return None
        except (TypeError, ValueError):
            pass
    for v in getattr(ds, "ImageType", None) or []:
        if str(v).strip().upper() in ("AXIAL", "SAGITTAL", "CORONAL"):
            return str(v).strip().lower()
    return None


def _article(word: str) -> str:
    first = word.split()[0] if word.split() else word
    vowel_sound = first[:1].lower() in "aeiou" or first in ("MR", "MRI", "X-ray", "NM", "MLO", "LAT", "SEG")
    return "An" if vowel_sound else "A"


def dicom_caption(metadata: dict[str, str], segments: list[str] | None = None) -> str:
    """A short factual sentence from safe metadata; says what is unknown instead of guessing."""
    code = metadata.get("Modality", "").upper()
    if not code:
        noun = "medical image of unrecorded modality"
    else:
        noun = MODALITY_WORDS.get(code, f"medical image (modality code {code})")
    colour = metadata.get("PhotometricInterpretation", "").upper() in _COLOUR_PHOTOMETRICS
    words = [w for w in (metadata.get("ImagePlane"), "colour" if colour else None, noun) if w]
    phrase = " ".join(words)
    text = f"{_article(phrase)} {phrase}"
    if metadata.get("Columns") and metadata.get("Rows"):
        text += f" ({metadata['Columns']} x {metadata['Rows']} pixels)"
    if segments:
        quoted = ", ".join(f'"{s}"' for s in segments)
        text += f" with the segment {quoted}" if len(segments) == 1 else f" with {len(segments)} segments: {quoted}"
    part = metadata.get("BodyPartExamined", "").strip().upper()
    tail: list[str] = []
    if part:
        text += " of " + _BODY_PARTS.get(part, "the " + part.lower().replace("_", " "))
    view = metadata.get("ViewPosition", "").strip().upper()
    if view:
        tail.append(_VIEWS.get(view, f"{view} view"))
    side = _LATERALITY.get(metadata.get("ImageLaterality", metadata.get("Laterality", "")).strip().upper())
    if side:
        tail.append(side)
    frames = metadata.get("NumberOfFrames", "")
    if frames.isdigit() and int(frames) > 1:
        n = int(frames)
        tail.append(f"frame {n // 2 + 1} of a {n}-frame sequence")
    if tail:
        text += ", " + ", ".join(tail)
    if not part:
        text += "; the body part is not recorded"
    return text + "."


def _window(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """DICOM linear VOI window to 0..1, or None when the file has no usable window."""
    try:
        centre = float(_first(ds.get("WindowCenter")))
        width = float(_first(ds.get("WindowWidth")))
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 1:
        return None
    out = ((arr - (centre - 0.5)) / (width - 1) + 0.5).clip(0.0, 1.0)
    # A window written for another series can blank the image; min-max is more useful then.
    return out if out.max() > out.min() else None


def _min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float64)
    return (arr - lo) / (hi - lo)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _render(ds: Any, frame: np.ndarray) -> np.ndarray:
    """One decoded frame -> 8-bit grey (H, W) or RGB (H, W, 3) array for display and training."""
    from pydicom import pixels

    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        frame = pixels.apply_color_lut(frame, ds)
    if frame.ndim == 3:
        # pixel_array(as_rgb=True) already turned YBR into RGB
        if frame.dtype == np.uint8:
            return frame
        bits = int(ds.get("BitsStored", 16) or 16) if photometric != "PALETTE COLOR" else 16
        return _to_uint8(frame.astype(np.float64) / float((1 << bits) - 1))
    values = pixels.apply_modality_lut(frame, ds).astype(np.float64)
    unit = _window(values, ds)
    if unit is None:
        unit = _min_max(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values as white
    return _to_uint8(unit)


def _segments(ds: Any, frame_index: int, frame: np.ndarray, phi: list[str]) -> tuple[list[str], list[Box]]:
    """Segment labels (safe ones) and the box of each segment visible in the rendered frame."""
    labels: dict[int, str] = {}
    for item in ds.get("SegmentSequence") or []:
        label = str(item.get("SegmentLabel", "") or "").strip()
        coded = ""
        for code in item.get("SegmentedPropertyTypeCodeSequence") or []:
            coded = str(code.get("CodeMeaning", "") or "").strip()
        # A segment label is free text: fall back to the coded term when it echoes an identifier.
        if label and any(p.lower() in label.lower() for p in phi if len(p) >= 3):
            label = coded
        label = label or coded
        if label:
            labels[int(item.get("SegmentNumber", len(labels) + 1))] = label
    if not labels:
        return [], []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    number = None
    if frame_index < len(per_frame):
        for ident in per_frame[frame_index].get("SegmentIdentificationSequence") or []:
            number = int(ident.get("ReferencedSegmentNumber", 0))
    if number is None and len(labels) == 1:
        number = next(iter(labels))
    boxes: list[Box] = []
    mask = np.asarray(frame) > 0
    if number in labels and mask.any():
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        h, w = mask.shape
        boxes.append(Box(labels[number], _pixel_box(cols[0], rows[0], cols[-1] + 1, rows[-1] + 1, w, h)))
    return list(labels.values()), boxes


def _read_dicom(path: Path, strict: bool) -> Any | None:
    """The dataset, or None for a file that is not DICOM (only allowed when not `strict`)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path))
    except InvalidDicomError:
        if not strict:
            return None
    except Exception as e:  # damaged files raise anything from EOFError to struct.error
        if not strict:
            return None
        raise KitError(f"cannot read DICOM file {path} ({type(e).__name__}: {_one_line(e)}); remove or replace it") from None
    # A .dcm without the 128-byte preamble is still common from older systems.
    try:
        ds = pydicom.dcmread(str(path), force=True)
    except Exception as e:
        raise KitError(f"cannot read DICOM file {path} ({type(e).__name__}: {_one_line(e)}); remove or replace it") from None
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        raise KitError(f"cannot read DICOM file {path}: it ends in .dcm but is not DICOM; remove or rename it")
    return ds


def _dicom_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() == ".dcm" or (not p.suffix and not name.startswith(".")):
                files.append(p)
    return files


def from_dicom(folder: Path, work_dir: Path) -> list[Record]:
    """Records from every DICOM image under `folder` (recursive), with an 8-bit PNG per file.

    Files ending in `.dcm` must be DICOM; files without an extension are used when pydicom can read
    them and silently skipped otherwise; DICOM objects without pixel data (reports, DICOMDIR) are
    skipped. Each image becomes `work_dir/images/<id>.png` (the middle frame of a multi-frame file,
    modality LUT then the file's window or min-max, MONOCHROME1 inverted, colour as RGB).

    Ids are `dicom-` + 12 hex chars of sha256 of the path relative to `folder`: stable, and unlike
    UIDs not traceable to the patient. Metadata holds only `DICOM_METADATA_ALLOWLIST` (coded or
    numeric tags); captions come from it. A segmentation's labels go to findings and the box of the
    segment shown in the PNG to boxes. Records are always private.

    Raises KitError for: a missing folder; a `.dcm` file that cannot be read; pixel data that cannot
    be decoded (a codec plugin is missing); a folder with no DICOM image.
    """
    from pydicom import pixels

    folder, work_dir = Path(folder), Path(work_dir)
    if not folder.is_dir():
        raise KitError(f"DICOM folder {folder} does not exist")
    records: list[Record] = []
    for path in _dicom_files(folder):
        ds = _read_dicom(path, strict=path.suffix.lower() == ".dcm")
        if ds is None or "PixelData" not in ds:
            continue
        rel = path.relative_to(folder).as_posix()
        rid = "dicom-" + hashlib.sha256(rel.encode("utf-8")).hexdigest()[:12]
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        index = n_frames // 2
        try:
            frame = pixels.pixel_array(ds, index=index if n_frames > 1 else None)
        except Exception as e:  # missing codec plugins and corrupt streams both land here
            raise KitError(
                f"cannot decode the pixel data of {path} ({type(e).__name__}: {_one_line(e)}); install the codec pydicom names "
                "(e.g. pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg) or remove the file"
            ) from None
        if frame.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
            frame = frame[frame.shape[0] // 2]  # frames the header did not count
        image = _render(ds, frame)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")  # no text chunks: nothing but pixels
        _atomic_write_bytes(work_dir / "images" / f"{rid}.png", buf.getvalue())

        metadata = _dicom_metadata(ds)
        labels: list[str] = []
        boxes: list[Box] = []
        if str(ds.get("Modality", "")).upper() == "SEG":
            labels, boxes = _segments(ds, index, frame, _dataset_phi(ds))
        records.append(
            Record(
                id=rid,
                image=f"images/{rid}.png",
                root=work_dir,
                captions=[dicom_caption(metadata, labels)],
                boxes=boxes,
                findings=[f"Segmented region: {label}" for label in labels],
                metadata=metadata,
                private=True,
                source=f"dicom#{rid}",  # not the path: folder names are often patient names
            )
        )
    if not records:
        raise KitError(f"no DICOM images under {folder} (looked for *.dcm and extensionless DICOM files)")
    return records
