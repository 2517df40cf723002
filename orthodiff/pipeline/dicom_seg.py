"""A predicted segmentation as a DICOM Segmentation object (highdicom) that references its source
DICOM series, so 3D Slicer, OHIF and a PACS show it aligned on the images it was predicted from.

One frame per source slice and segment (empty frames omitted), on the source slices' own
positions and orientation; one segment per class but the background (label 0), labelled with
the class name. Only for series read from DICOM: a NIfTI or NRRD input has no images to refer to.

Scanners and anonymisers write patient and study values that the standard does not allow
(PatientSex '0000', dates such as '2021-13-45', names of 80 characters). The SEG copies those
values from its source, so they are checked on a copy of the source headers first: a value that
does not conform is written empty where the attribute must be present (type 2) and left out
otherwise, and each change is returned with its reason. Only missing geometry or identity (what
the SEG must point at) stops the SEG from being written.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import OrthodiffError
from ..fileio import atomic_path

ALGORITHM = "orthodiff"
SERIES_NUMBER = 9901  # high, so viewers list the derived series after the acquired ones
# Patient and study attributes a SEG must hold, possibly empty (type 2); highdicom reads them all.
TYPE2_INHERITED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "AccessionNumber", "StudyID")
# The other single-valued attributes of the Patient, Clinical Trial Subject, General Study, Patient
# Study and Clinical Trial Study modules (PS3.3 C.7.1.1, C.7.1.3, C.7.2.1-3), which a SEG copies
# from its source when present. Sequences are copied as they are.
OPTIONAL_INHERITED = (
    "IssuerOfPatientID", "TypeOfPatientID", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar", "QualityControlSubject",
    "StrainDescription", "StrainNomenclature", "StrainAdditionalInformation", "OtherPatientNames",
    "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber", "ConsultingPhysicianName", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingService", "AdmittingDiagnosesDescription",
    "PatientAge", "PatientSize", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
    "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit", "AdmissionID",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "PatientState", "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent", "LongitudinalTemporalEventType",
    "IssuerOfClinicalTrialTimePointID",
)
SEX_VALUES = ("M", "F", "O")
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
CHARSET_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}  # the VRs that SpecificCharacterSet applies to
DEFAULT_REPERTOIRE = ("", "ISO_IR 6")  # ASCII; pydicom reads it leniently as Latin-1
PN_GROUP_MAX = 64  # characters per component group of a person name (PS3.5 6.2)


@dataclass(frozen=True)
class HeaderChange:
    """One patient or study attribute the SEG does not copy as the source holds it."""

    attribute: str
    reason: str
    action: str  # "written empty" (type 2) or "left out"

    def to_json(self) -> dict:
        return asdict(self)


def source_datasets(row: dict) -> list:
    """The DICOM headers of a manifest row's volume, in the volume's slice order (k = 0, 1, ...)."""
    import pydicom

    from ..io.dicom import index_dicom_folder

    volumes, _ = index_dicom_folder(row["path"])
    uid = str(row.get("series_uid") or "")
    echo = row.get("echo_index")
    echo = -1 if echo is None or (isinstance(echo, float) and np.isnan(echo)) else int(echo)
    matches = [v for v in volumes if (not uid or v.series_uid == uid) and (echo < 0 or v.echo_index == echo)]
    if len(matches) != 1:
        raise OrthodiffError(f"{row['path']}: cannot find the source slices of series {row['series_id']} again")
    return [pydicom.dcmread(str(path), stop_before_pixels=True) for path in matches[0].files]


def write_dicom_seg(path: Path, labels: np.ndarray, classes: list[str], sources: list) -> list[HeaderChange]:
    """Write ``labels`` (i = columns, j = rows, k = slices, on the source grid; values are class
    indices) as a DICOM SEG referencing ``sources`` (one header per slice k, left unchanged).

    Returns the patient and study attributes written otherwise than the sources hold them.
    Raises ``OrthodiffError`` when the sources' geometry or identity cannot be referenced."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    labels = np.asarray(labels)
    if labels.shape[2] != len(sources):
        raise OrthodiffError(f"{path}: {labels.shape[2]} segmentation slices for {len(sources)} source images")
    check_referable(sources, rows=labels.shape[1], columns=labels.shape[0])
    headers, changes = conforming_copies(sources)
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8)  # (slices, rows, cols)
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM, version=__version__,
                                                   family=codes.DCM.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(name),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(classes[1:], start=1)
    ]
    with warnings.catch_warnings():  # archives' one-part patient names ("P0001") are copied as they are
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        seg = _segmentation(hd, headers, frames, segments, __version__)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return changes


# ----------------------------------------------------------------------- what the SEG points at
def check_referable(sources: list, rows: int, columns: int) -> None:
    """Raise ``OrthodiffError`` naming the first source image the SEG cannot refer to or lie on:
    no SOP instance, study, series or frame-of-reference UID, no usable orientation, position or
    pixel spacing, another matrix than the segmentation's, or an orientation unlike the first slice's."""
    seen: set = set()
    first_orientation = None
    for index, header in enumerate(sources):
        name = getattr(header, "filename", None) or f"source image {index + 1}"
        problem = _unreferable(header, rows, columns, seen)
        if problem is None:
            orientation = np.asarray([float(v) for v in header.ImageOrientationPatient])
            if first_orientation is None:
                first_orientation = orientation
            elif np.abs(orientation - first_orientation).max() > 1e-3:
                problem = "its ImageOrientationPatient differs from the first slice's (a SEG holds one plane orientation)"
        if problem is not None:
            raise OrthodiffError(f"{name}: {problem}; the DICOM SEG cannot be aligned to this series "
                                 "(the NIfTI segmentation holds the result; re-export the series with complete "
                                 "geometry for a DICOM SEG)")
        seen.add(str(header.SOPInstanceUID))


def _unreferable(header, rows: int, columns: int, seen: set) -> str | None:
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not str(header.get(keyword, "") or "").strip():
            return f"no {keyword}"
    if str(header.SOPInstanceUID) in seen:
        return f"SOPInstanceUID {header.SOPInstanceUID} is shared with another slice"
    orientation = _numbers(header, "ImageOrientationPatient", 6)
    if orientation is None:
        return "no usable ImageOrientationPatient (six numbers)"
    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(column) - 1) > 1e-2 or abs(row @ column) > 1e-2:
        return "ImageOrientationPatient is not two orthogonal unit vectors"
    if _numbers(header, "ImagePositionPatient", 3) is None:
        return "no usable ImagePositionPatient (three numbers)"
    spacing = _numbers(header, "PixelSpacing", 2)
    if spacing is None or (spacing <= 0).any():
        return "no usable PixelSpacing (two positive numbers)"
    if (header.get("Rows"), header.get("Columns")) != (rows, columns):
        return f"{header.get('Rows')} x {header.get('Columns')} pixels where the segmentation has {rows} x {columns}"
    return None


def _numbers(header, keyword: str, count: int) -> np.ndarray | None:
    value = header.get(keyword)
    try:
        numbers = np.asarray([float(v) for v in value], dtype=float) if value is not None else None
    except (TypeError, ValueError):
        return None
    if numbers is None or numbers.shape != (count,) or not np.isfinite(numbers).all():
        return None
    return numbers


# ------------------------------------------------------------------ what the SEG copies from them
def conforming_copies(sources: list) -> tuple[list, list[HeaderChange]]:
    """Copies of ``sources`` whose patient and study attributes all conform to the standard, and
    the changes made (one per attribute, as the first differing slice shows it)."""
    headers = [copy.deepcopy(header) for header in sources]
    changes: dict[str, HeaderChange] = {}
    for header in headers:
        for change in _conform(header):
            changes.setdefault(change.attribute, change)
    return headers, list(changes.values())


def _conform(header) -> list[HeaderChange]:
    changes = []
    charset = header.get("SpecificCharacterSet")
    for keyword in TYPE2_INHERITED + OPTIONAL_INHERITED:
        required = keyword in TYPE2_INHERITED
        if keyword not in header:
            if required:
                setattr(header, keyword, "")
                changes.append(HeaderChange(keyword, "absent from the source", "written empty"))
            continue
        reason = nonconformity(header[keyword], charset)
        if reason is None:
            continue
        if required:
            header[keyword].value = ""
        else:
            del header[keyword]
        changes.append(HeaderChange(keyword, reason, "written empty" if required else "left out"))
    return changes


def nonconformity(element, charset=None) -> str | None:
    """Why a data element's value does not conform to its VR (or, for PatientSex, to its defined
    terms), or to the dataset's SpecificCharacterSet ``charset``; None when it conforms."""
    from pydicom import config
    from pydicom.valuerep import DA, TM, validate_value

    if element.VR not in TEXT_VRS or element.value is None:
        return None
    values = list(element.value) if element.VM > 1 else [element.value]
    for value in values:
        text = str(value)
        if not text:
            continue
        if "\ufffd" in text:  # pydicom's stand-in for bytes its character set cannot decode
            return "bytes not valid in the dataset's SpecificCharacterSet"
        if element.VR in CHARSET_VRS and not _encodable(text, charset):
            return "characters outside the dataset's SpecificCharacterSet"
        if element.keyword == "PatientSex" and text not in SEX_VALUES:
            return f"{text!r} is not M, F or O"
        if element.VR == "PN" and any(len(group) > PN_GROUP_MAX for group in text.split("=")):
            return f"a name component group longer than {PN_GROUP_MAX} characters"
        for vr, parse, form in (("DA", DA, "a date YYYYMMDD"), ("TM", TM, "a time HHMMSS.FFFFFF")):
            if element.VR == vr:
                try:
                    parse(text)
                except ValueError:
                    return f"not {form}"
        try:
            validate_value(element.VR, text, config.RAISE)
        except ValueError:
            return f"not a valid {element.VR} value (length or characters)"
    return None


def _encodable(text: str, charset) -> bool:
    """Whether ``text`` can be written in ``charset`` (one character set; code extensions, several
    values, are not checked)."""
    from pydicom.charset import python_encoding

    values = [str(v) for v in charset] if charset is not None and not isinstance(charset, str) else [charset or ""]
    if len(values) > 1:
        return True
    name = values[0].strip()
    codec = "ascii" if name in DEFAULT_REPERTOIRE else python_encoding.get(name)
    if codec is None:
        return True  # a character set pydicom does not know: decoding it already reported what it could not read
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _segmentation(hd, sources, frames, segments, version):
    from pydicom.uid import generate_uid

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=ALGORITHM,
        manufacturer_model_name=ALGORITHM,
        software_versions=version,
        device_serial_number="0",
        series_description=f"{ALGORITHM} segmentation"[:64],
        omit_empty_frames=bool(frames.any()),  # a SEG needs at least one frame
    )
