"""What a DICOM file may say about itself: the identifying tags kit never copies, the coded tags it
reads, and the caption those give. Shared by the DICOM source and the packaged medical sample."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom import dcmread
from pydicom.multival import MultiValue

from kit.core.errors import KitError
from kit.ingest.sources.common import one_line


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

# Coded or numeric tags. The value representation a file declares is no guarantee (a CS tag can
# hold "JANE DOE 1970"), so each value must also be one of the standard's terms or a number
# (`dicom_codes.yaml`), and must not repeat the file's own identity values (`identity_tokens`).
DICOM_METADATA_ALLOWLIST: tuple[str, ...] = (
    "Modality", "BodyPartExamined", "ViewPosition", "PatientPosition", "ImageType", "PhotometricInterpretation",
    "Rows", "Columns", "NumberOfFrames", "SliceThickness", "PixelSpacing", "ImageLaterality", "Laterality",
    "SegmentationType",
)
_SAFE_VRS = {"CS", "DS", "IS", "US", "UL", "SS"}
# Tags whose values say who the patient (or the staff) is: no text kit copies may repeat them.
IDENTITY_KEYWORDS: tuple[str, ...] = (
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientID", "OtherPatientIDs",
    "IssuerOfPatientID", "PatientBirthDate", "AccessionNumber", "ResponsiblePerson", "ReferringPhysicianName",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "PatientAddress", "MedicalRecordLocator",
)


@dataclass(frozen=True)
class DicomCodes:
    """What `dicom_codes.yaml` allows: coded terms per tag, numeric tags, and where burned-in text is likely."""

    terms: dict[str, frozenset[str]]
    integers: frozenset[str]
    decimals: frozenset[str]
    burned_in_modalities: frozenset[str]
    burned_in_sop_classes: frozenset[str]


@functools.cache
def dicom_codes() -> DicomCodes:
    raw = yaml.safe_load(resources.files("kit.ingest.sources").joinpath("dicom_codes.yaml").read_text(encoding="utf-8"))
    names = {k: frozenset(str(v) for v in raw.pop(k)) for k in ("integers", "decimals")}
    where = {k: frozenset(str(v).strip().upper() for v in raw.pop(k)) for k in ("burned_in_modalities", "burned_in_sop_classes")}
    terms = {k: frozenset(" ".join(str(v).upper().split()) for v in vals) for k, vals in raw.items()}
    return DicomCodes(terms, names["integers"], names["decimals"], burned_in_modalities=where["burned_in_modalities"], burned_in_sop_classes=where["burned_in_sop_classes"])


_TOKEN = re.compile(r"[^\W_]+")


def tokens(text: str) -> set[str]:
    """Lower-case runs of letters and digits (a name's parts, an ID, a date)."""
    return {t for t in _TOKEN.findall(str(text).lower())}


def identity_tokens(ds: Any) -> frozenset[str]:
    """The parts of the file's identity values (names split at ^ and spaces, IDs, the birth date and
    its year, staff names), top level and file meta; parts shorter than 2 characters are too common
    to mean anything."""
    out: set[str] = set()
    for kw in IDENTITY_KEYWORDS:
        el = ds.get(kw) if kw in ds else None
        value = getattr(el, "value", el)
        if value is None or isinstance(value, (bytes, bytearray)):
            continue
        for v in (list(value) if is_multi(value) else [value]):
            text = str(v).strip()
            out |= tokens(text)
            if kw == "PatientBirthDate" and len(text) >= 4 and text[:4].isdigit():
                out.add(text[:4])
    return frozenset(t for t in out if len(t) >= 2)


def repeats_identity(text: str, identity: frozenset[str]) -> bool:
    """Whether `text` holds any part of the file's identity values as a whole word."""
    return bool(identity and tokens(text) & identity)

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


def is_multi(value: Any) -> bool:
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
        values = list(el.value) if is_multi(el.value) else [el.value]  # PersonName iterates by character
        for v in values:
            s = str(v).strip()
            if s and s not in out:
                out.append(s)


def phi_values(path: Path) -> list[str]:
    """String values of every `PHI_KEYWORDS` tag in a DICOM file, nested sequences and file meta
    included; values inside a PHI sequence count too. Empty values are left out.

    Raises KitError when the file cannot be read as DICOM.
    """
    try:
        ds = dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types for damaged files
        raise KitError(f"cannot read DICOM file {path}: {one_line(e)}") from None
    return dataset_phi(ds)


def dataset_phi(ds: Any) -> list[str]:
    out: list[str] = []
    if getattr(ds, "file_meta", None) is not None:
        _walk_phi(ds.file_meta, False, out)
    _walk_phi(ds, False, out)
    return out


def first_value(value: Any) -> Any:
    if value is None:
        return None
    if is_multi(value):
        items = list(value)
        return items[0] if items else None
    return value


_INTEGER = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[-+]?[0-9]{0,9}(\.[0-9]{0,9})?([eE][-+]?[0-9]{1,3})?")


def _allowed(kw: str, value: str, codes: DicomCodes) -> bool:
    if kw in codes.integers:
        return bool(_INTEGER.fullmatch(value))
    if kw in codes.decimals:
        return bool(_DECIMAL.fullmatch(value)) and any(c.isdigit() for c in value)
    return " ".join(value.upper().split()) in codes.terms.get(kw, frozenset())


def safe_metadata(ds: Any, dropped: list[str] | None = None) -> dict[str, str]:
    """The allowlisted tags whose values are standard terms or numbers and repeat no identity
    value of the file; each value left out is named (tag only, never its value) in `dropped`."""
    codes, identity = dicom_codes(), identity_tokens(ds)
    out: dict[str, str] = {}
    for kw in DICOM_METADATA_ALLOWLIST:
        if kw not in ds:  # top level only: nested items belong to other images or people
            continue
        el = ds.data_element(kw)
        if el is None or el.VR not in _SAFE_VRS or el.value is None or el.value == "":
            continue
        values = [str(v).strip() for v in (el.value if is_multi(el.value) else [el.value]) if str(v).strip()]
        kept = [v for v in values if _allowed(kw, v, codes) and (kw in codes.integers or kw in codes.decimals
                                                                   or not repeats_identity(v, identity))]
        if len(kept) < len(values) and dropped is not None:
            dropped.append(kw)
        if kept:
            out[kw] = ", ".join(kept)
    plane = _plane(ds)
    if plane:
        out["ImagePlane"] = plane
    return out


def needs_burned_in_check(ds: Any) -> str | None:
    """Why this image's pixels may show identifying text, or None: BurnedInAnnotation YES, or no
    BurnedInAnnotation at all on a modality / SOP class that usually has text in its pixels."""
    said = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if said == "YES":
        return "BurnedInAnnotation is YES, so its pixels may show identifying text"
    if said == "NO":
        return None
    codes = dicom_codes()
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop = str(ds.get("SOPClassUID", "") or "").strip()
    if modality in codes.burned_in_modalities:
        return f"it is a {modality} image without a BurnedInAnnotation tag, and such images often show names or IDs in their pixels"
    if sop in codes.burned_in_sop_classes:
        return "it is a secondary capture without a BurnedInAnnotation tag, and screen captures often show names or IDs"
    return None


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
