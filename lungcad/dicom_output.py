"""DICOM output of `lungcad analyze` for DICOM input: a SEG of the nodules and a TID 1500 SR of their measurements.

Both are written with highdicom, so the objects follow the IODs a PACS or viewer (OHIF, 3D Slicer) expects:

- **SEG** (`write_seg`): binary segmentation, one segment per nodule (segment *j* = the *j*-th nodule of the
  report, labelled "Nodule <index>"), category "Morphologically abnormal structure" (SCT 49755003), type
  "Nodule" (SCT 27925004), anatomic region "Lung" (SCT 39607008), algorithm `lungcad` (family "Artificial
  Intelligence", DCM 123110). One frame per source slice that holds the segment, each referencing its source
  slice and carrying its position, so the SEG overlays the series it came from.
- **SR** (`write_sr`): Comprehensive 3D SR, TID 1500 Measurement Report, one TID 1411 volumetric group per
  nodule, referencing the SEG segment and the source series: volume (SCT 118565006, mm3), long axis
  (SCT 103339001, mm), short axis (SCT 103340004, mm), mean diameter and maximal 3D diameter (SCT 81827009
  "Diameter" with derivation Mean / Maximum, mm), probability of cancer (DCM 111047, no units, 0–1), and the
  Lung-RADS v2022 category as a qualitative evaluation ("Assessment Category", DCM 111005; the category value is
  coded in the private scheme ``99LUNGCAD`` because no public code for Lung-RADS categories exists in the
  DICOM resources highdicom ships). The SR says it is research decision support, not a diagnosis, in its
  Series Description.

The objects copy the source's patient and study modules (DICOM requires them). ``anonymize=True`` replaces
Patient's Name with ``ANONYMIZED^`` (family name only), Patient ID with ``ANONYMIZED``, empties Patient's Birth Date, and empties
the other identifying attributes highdicom copies from the source (Referring Physician's Name, Accession
Number, Study ID, Patient's Sex, Patient's Age); UIDs stay, because they tie the objects to the source series.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from common import atomic

__all__ = ["ANONYMIZED", "write_seg", "write_sr"]

#: What `anonymize=True` writes for Patient's Name and Patient ID.
ANONYMIZED = "ANONYMIZED"
#: Attributes emptied by `anonymize=True` besides name and ID (birth date included).
_EMPTIED = (
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)
_REMOVED = (
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "IssuerOfPatientID",
)

_LUNG_RADS_SCHEME = "99LUNGCAD"
_CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
_SERIES_DESCRIPTION_SEG = "lungcad nodules (research, not a diagnosis)"
_SERIES_DESCRIPTION_SR = "lungcad measurements (research, not a diagnosis)"


def _generator(report: dict[str, Any]) -> tuple[str, str]:
    gen = report.get("generator") or {}
    return str(gen.get("name", "lungcad")), str(gen.get("version", "0"))


def _algorithm(report: dict[str, Any]) -> hd.AlgorithmIdentificationSequence:
    name, version = _generator(report)
    return hd.AlgorithmIdentificationSequence(
        name=name, family=codes.DCM.ArtificialIntelligence, version=version
    )


def _nodules(report: dict[str, Any]) -> list[dict[str, Any]]:
    nodules = list(report.get("nodules") or [])
    labels = [int(n.get("label", n["index"])) for n in nodules]
    if len(set(labels)) != len(labels):
        raise ValueError(f"report nodules repeat a label value ({labels}); each nodule needs its own label")
    return nodules


def _check_sources(source_datasets: Sequence[pydicom.Dataset]) -> None:
    if not source_datasets:
        raise ValueError("no source DICOM slices given; DICOM SEG/SR are written for DICOM input only")
    missing = [
        kw
        for kw in ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if kw not in source_datasets[0]
    ]
    if missing:
        raise ValueError(
            f"source series {source_datasets[0].get('SeriesInstanceUID', '?')} lacks {', '.join(missing)} (Type 1 in "
            "the CT image IOD); a SEG must share the source's frame of reference, re-export the series with it"
        )


def _anonymize(ds: pydicom.Dataset) -> None:
    ds.PatientName = f"{ANONYMIZED}^"  # family name only (a trailing caret marks a one-component name)
    ds.PatientID = ANONYMIZED
    for keyword in _EMPTIED:
        if keyword in ds:
            setattr(ds, keyword, "")
    for keyword in _REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "lungcad --anonymize"


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def write_seg(
    source_datasets: Sequence[pydicom.Dataset],
    labels: np.ndarray,
    report: dict[str, Any],
    path: str | Path,
    *,
    anonymize: bool = False,
) -> Path:
    """Write a binary DICOM SEG with one segment per nodule of `report`, on the source slices' grid.

    Args:
        source_datasets: the source CT headers sorted as the volume's z index (`read_dicom_ct`).
        labels: uint (z, y, x) on the source grid; value = the nodule's ``label`` (= ``index``), 0 = background.
        report: the report dict (contract layout); ``nodules[*].index/label`` and ``generator`` are used.
        path: the `.dcm` file to write (atomically).
        anonymize: replace/empty the patient identifiers copied from the source (module docstring).

    Returns:
        `path`.
    """
    _check_sources(source_datasets)
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"labels must be a non-negative integer label volume, got dtype {labels.dtype}")
    rows, cols = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    if labels.shape != (len(source_datasets), rows, cols):
        raise ValueError(
            f"labels have shape {labels.shape} but the source series is {(len(source_datasets), rows, cols)} (z, y, x)"
        )
    nodules = _nodules(report)
    if not nodules:
        raise ValueError(
            "the report has no nodules; a DICOM SEG needs at least one segment, write none instead"
        )
    # Segment numbers must run 1..K: map each nodule's label value to its position in the report.
    lookup = np.zeros(
        int(max(labels.max(), max(int(n.get("label", n["index"])) for n in nodules))) + 1, np.uint16
    )
    descriptions = []
    algorithm_type = (
        hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
        if report.get("mode") == "given-nodules"
        else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    )
    for number, nodule in enumerate(nodules, start=1):
        label = int(nodule.get("label", nodule["index"]))
        lookup[label] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"Nodule {int(nodule['index'])}",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Nodule,
                algorithm_type=algorithm_type,
                algorithm_identification=_algorithm(report),
                tracking_uid=generate_uid(),
                tracking_id=f"Nodule {int(nodule['index'])}",
                anatomic_regions=[codes.SCT.Lung],
            )
        )
    unknown = sorted(
        set(np.unique(labels).tolist()) - {0} - {int(n.get("label", n["index"])) for n in nodules}
    )
    if unknown:
        raise ValueError(
            f"labels hold value(s) {unknown[:5]} that no nodule of the report has; pass the report's labels"
        )
    segments = lookup[labels]
    name, version = _generator(report)
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=name,
        manufacturer_model_name=name,
        software_versions=version,
        device_serial_number="0",
        series_description=_SERIES_DESCRIPTION_SEG,
    )
    if anonymize:
        _anonymize(seg)
    return _save(seg, path)


def _measurement(name, value, unit, derivation=None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, derivation=derivation)


def _lung_rads_value(category: dict[str, Any]) -> hd.sr.CodedConcept:
    cat = str(category["category"])
    descriptor = str(category.get("descriptor", "")).strip()
    meaning = f"Lung-RADS v2022 category {cat}" + (f": {descriptor}" if descriptor else "")
    return hd.sr.CodedConcept(value=f"LR{cat}", scheme_designator=_LUNG_RADS_SCHEME, meaning=meaning[:64])


def write_sr(
    source_datasets: Sequence[pydicom.Dataset],
    seg_path: str | Path,
    report: dict[str, Any],
    path: str | Path,
    *,
    anonymize: bool = False,
) -> Path:
    """Write a Comprehensive 3D SR (TID 1500) with each nodule's measurements, referencing the SEG and the series.

    Args:
        source_datasets: the source CT headers (`read_dicom_ct`); all go into the SR's evidence.
        seg_path: the SEG written by `write_seg` for the same report (segment *j* = *j*-th nodule).
        report: the report dict (contract layout).
        path: the `.dcm` file to write (atomically).
        anonymize: replace/empty the patient identifiers copied from the source (module docstring).

    Returns:
        `path`.
    """
    _check_sources(source_datasets)
    nodules = _nodules(report)
    if not nodules:  # TID 1500 needs at least one measurement group (highdicom enforces it)
        raise ValueError("the report has no nodules; a TID 1500 SR needs at least one, write none instead")
    seg = pydicom.dcmread(seg_path)
    n_segments = len(seg.get("SegmentSequence", []))
    if n_segments != len(nodules):
        raise ValueError(f"{seg_path}: holds {n_segments} segments but the report has {len(nodules)} nodules")
    name, version = _generator(report)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[name, version]),
            name=f"{name} {version}"[:64],
            manufacturer_name=name,
        ),
    )
    source_series = hd.sr.SourceSeriesForSegmentation(str(source_datasets[0].SeriesInstanceUID))
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version)
    groups = []
    for number, nodule in enumerate(nodules, start=1):
        m = nodule["measurements"]
        measurements = [
            _measurement(codes.SCT.Volume, m["volume_mm3"], codes.UCUM.CubicMillimeter),
            _measurement(codes.SCT.LongAxis, m["long_axis_mm"], codes.UCUM.Millimeter),
            _measurement(codes.SCT.ShortAxis, m["short_axis_mm"], codes.UCUM.Millimeter),
            _measurement(codes.SCT.Diameter, m["mean_diameter_mm"], codes.UCUM.Millimeter, codes.SCT.Mean),
            _measurement(
                codes.SCT.Diameter, m["max_3d_diameter_mm"], codes.UCUM.Millimeter, codes.SCT.Maximum
            ),
            _measurement(codes.DCM.ProbabilityOfCancer, nodule["malignancy_probability"], codes.UCUM.NoUnits),
        ]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(), identifier=f"Nodule {int(nodule['index'])}"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=source_series,
                ),
                finding_type=codes.SCT.Nodule,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
                measurements=measurements,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        codes.DCM.AssessmentCategory, _lung_rads_value(nodule["category"])
                    )
                ],
            )
        )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_CT_CHEST,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets, seg],
        content=content[0],
        series_instance_uid=generate_uid(),
        series_number=9002,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=name,
        series_description=_SERIES_DESCRIPTION_SR,
    )
    if anonymize:
        _anonymize(sr)
    return _save(sr, path)
