"""``OrthoDiffusionPipeline``: the three denoisers, the heads, preprocessing, labels and thresholds
in one directory that predicts a new study.

Directory layout (safetensors and JSON only; nothing is unpickled when it is loaded)::

    pipeline.json                 format, version, labels, classes, thresholds, preprocessing,
                                  head specs, what the training series were (``training_domain``, see
                                  ``pipeline.domain``), provenance, and the sha256 of every weight
                                  file and of the spec (checked on load) (written last: it marks the
                                  folder complete)
    denoisers/<plane>/            config.json + model.safetensors (the classifier's denoisers)
    segment_denoisers/<plane>/    only when the segmentation run fine-tuned its own denoisers
    classifier.safetensors        the diagnosis head; its metadata holds the label names in output order
    segmenter.safetensors         the segmentation head (when a segment run was given); its metadata
                                  holds the class names
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import OrthodiffError, ScanError
from ..fileio import atomic_directory, atomic_path, read_format_json, read_json, sha256_file, write_json
from ..io.volume import Volume
from ..models.numerics import exact_float32
from ..planes import PLANES

FORMAT = "orthodiff-pipeline"
VERSION = 1
CONFIG_NAME = "pipeline.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
SEGMENTER_WEIGHTS = "segmenter.safetensors"
# parts of pipeline.json that decide the numbers and the notes; their checksums are recorded at export
SPEC_KEYS = ("labels", "classes", "preprocessing", "classifier", "segmenter", "training_domain")
EXPORT_HINT = "export the pipeline again (orthodiff export CLASSIFY_RUN --out DIR)"


# ------------------------------------------------------------------------------- results
@dataclass
class SeriesPrediction:
    """What the pipeline made of one plane's series: plane tensor, segmentation and heat maps,
    each both on the plane-tensor grid (``*_tensor``) and on the series' own voxel grid."""

    plane: str
    source_shape: tuple
    source_affine: np.ndarray
    tensor_affine: np.ndarray
    image_tensor: np.ndarray  # (D, H, W) float32 in [-1, 1]
    crop_box: tuple | None = None  # the field-of-view crop, (start, end) source voxel indices; None: uncropped
    segmentation_tensor: np.ndarray | None = None  # (D, H, W) uint8
    segmentation: np.ndarray | None = None  # source_shape uint8
    heatmaps_tensor: dict = field(default_factory=dict)  # {label: (D, H, W) float32 in [0, 1]}
    heatmaps: dict = field(default_factory=dict)  # {label: source_shape float32}


@dataclass
class StudyPrediction:
    study_id: str
    probabilities: dict  # {label: float}
    thresholds: dict  # {label: float}
    decisions: dict  # {label: bool}
    planes_used: list
    planes_missing: dict  # {plane: why}
    series: dict = field(default_factory=dict)  # {plane: SeriesPrediction}
    classes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "study_id": self.study_id,
            "labels": {
                label: {
                    "probability": round(float(p), 6),
                    "threshold": round(float(self.thresholds[label]), 6),
                    "decision": bool(self.decisions[label]),
                }
                for label, p in self.probabilities.items()
            },
            "planes_used": list(self.planes_used),
            "planes_missing": dict(self.planes_missing),
        }


# ------------------------------------------------------------------------------- pipeline
class OrthoDiffusionPipeline:
    """Denoisers + heads + preprocessing + thresholds. Build with :meth:`from_runs`, ship with
    :meth:`save_pretrained`, reload with :meth:`from_pretrained`, predict with :meth:`predict_study`."""

    def __init__(
        self,
        config: dict,
        denoisers: Mapping[str, torch.nn.Module],
        classifier: torch.nn.Module,
        segment_denoisers: Mapping[str, torch.nn.Module] | None = None,
        segmenter: torch.nn.Module | None = None,
    ):
        if (segmenter is None) != (config.get("segmenter") is None):
            raise OrthodiffError("OrthoDiffusionPipeline: give a segmenter exactly when config['segmenter'] is set")
        self.config = config
        self.denoisers = dict(denoisers)
        self.classifier = classifier.eval()
        self.segment_denoisers = dict(segment_denoisers) if segment_denoisers is not None else None
        self.segmenter = segmenter.eval() if segmenter is not None else None
        self.device = torch.device("cpu")

    # ---------------------------------------------------------------------------- facts
    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])

    @property
    def classes(self) -> list[str]:
        return list(self.config.get("classes") or [])

    @property
    def thresholds(self) -> dict[str, float]:
        return {label: float(entry["value"]) for label, entry in self.config["thresholds"].items()}

    @property
    def plane_size(self) -> dict[str, tuple]:
        return {p: tuple(int(v) for v in s) for p, s in self.config["preprocessing"]["plane_size"].items()}

    @property
    def training_domain(self) -> dict | None:
        """What the classify run trained on, per plane (see ``pipeline.domain``); None in pipelines
        saved before it was recorded."""
        return self.config.get("training_domain")

    @property
    def series_selection(self) -> dict | None:
        """``data.series`` of the training run (None in pipelines saved before it was recorded)."""
        return self.config["preprocessing"].get("series")

    @property
    def planes(self) -> list[str]:
        wanted = set(self.config["classifier"]["planes"])
        if self.config.get("segmenter"):
            wanted |= set(self.config["segmenter"]["planes"])
        return [p for p in PLANES if p in wanted]

    def describe(self) -> str:
        seg = f"; segments {len(self.classes)} classes" if self.segmenter is not None else ""
        sizes = ", ".join(f"{p} {'x'.join(map(str, s))}" for p, s in self.plane_size.items() if p in self.planes)
        return (f"OrthoDiffusionPipeline v{VERSION}: {len(self.labels)} labels ({', '.join(self.labels)}){seg}; "
                f"planes {sizes}")

    def to(self, device) -> OrthoDiffusionPipeline:
        self.device = torch.device(device)
        modules = [*self.denoisers.values(), *(self.segment_denoisers or {}).values(), self.classifier, self.segmenter]
        for module in modules:
            if module is not None:
                module.to(self.device)
        return self

    # ------------------------------------------------------------------------- assembling
    @classmethod
    def from_runs(cls, classify_run, segment_run=None, pretrained=None) -> OrthoDiffusionPipeline:
        """Assemble from ``orthodiff finetune classify`` (and optionally ``segment``) run directories.

        ``pretrained``: the ``orthodiff pretrain`` output a probe run read its denoisers from
        (default: the path recorded in the run). A run that saved its own ``denoisers/`` uses those.
        """
        from ..data.prepare import INTENSITY_PERCENTILES, PLANE_AXCODES, check_field_of_view
        from . import runs
        from .domain import run_training_domain

        classify_run = Path(classify_run)
        info, head = runs.read_run_json(classify_run, "classify")
        cfg = runs.run_config(classify_run)
        labels = list(head.get("labels") or info.get("labels") or [])
        spec = runs.classifier_spec(classify_run, info, head, cfg)
        denoisers, where = runs.run_denoisers(classify_run, info, cfg, spec["planes"], pretrained)
        runs.check_fingerprints(denoisers, head, classify_run, where)
        classifier = build_classifier(spec, labels, denoisers)
        _load_weights(classifier, classify_run / "head.safetensors")
        config = {
            "format": FORMAT,
            "version": VERSION,
            "labels": labels,
            "classes": [],
            "thresholds": runs.run_thresholds(classify_run, labels),
            "preprocessing": {
                "plane_size": {p: list(d.plane_size) for p, d in denoisers.items()},
                "slice_spacing": cfg.data.slice_spacing,
                "slab": cfg.data.slab,
                "field_of_view_mm": {p: list(e) for p, e in check_field_of_view(cfg.data.field_of_view_mm).items()},
                "orientation": dict(PLANE_AXCODES),
                "intensity_percentiles": list(INTENSITY_PERCENTILES),
                "series": dataclasses.asdict(cfg.data.series),  # the selection training used
            },
            "classifier": spec,
            "segmenter": None,
            "training_domain": run_training_domain(info, cfg),
            "sources": {"classify_run": str(classify_run.resolve()), "classify_denoisers": where},
        }
        segment_denoisers = segmenter = None
        if segment_run is not None:
            segment_run = Path(segment_run)
            seg_info, seg_head = runs.read_run_json(segment_run, "segment")
            seg_cfg = runs.run_config(segment_run)
            seg_spec = runs.segmenter_spec(segment_run, seg_info, seg_head, seg_cfg)
            segment_denoisers, seg_where = runs.run_denoisers(segment_run, seg_info, seg_cfg, seg_spec["planes"], pretrained)
            _check_sizes(config["preprocessing"]["plane_size"], segment_denoisers, segment_run)
            if check_field_of_view(seg_cfg.data.field_of_view_mm) != check_field_of_view(cfg.data.field_of_view_mm):
                raise OrthodiffError(
                    f"{segment_run}: trained with data.field_of_view_mm={seg_cfg.data.field_of_view_mm}, the classifier "
                    f"with {cfg.data.field_of_view_mm}; train both with one data.field_of_view_mm"
                )
            for plane, denoiser in segment_denoisers.items():
                config["preprocessing"]["plane_size"].setdefault(plane, list(denoiser.plane_size))
            if _same_weights(denoisers, segment_denoisers):
                segment_denoisers = {p: denoisers[p] for p in segment_denoisers}
                seg_spec["denoisers"] = "denoisers"
            else:
                seg_spec["denoisers"] = "segment_denoisers"
            config["classes"] = list(seg_head.get("classes") or seg_info.get("classes") or [])
            seg_spec.setdefault("image_channels", _image_channels(seg_spec, seg_head, segment_run, segment_denoisers))
            segmenter = build_segmenter(seg_spec, len(config["classes"]), segment_denoisers)
            _load_weights(segmenter, segment_run / "head.safetensors")
            config["segmenter"] = seg_spec
            config["sources"].update(segment_run=str(segment_run.resolve()), segment_denoisers=seg_where)
        return cls(config, denoisers, classifier, segment_denoisers, segmenter)

    # ----------------------------------------------------------------------- save / load
    def save_pretrained(self, directory) -> Path:
        """Write the pipeline directory atomically: built in a temporary folder beside it, then renamed."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists() and not (directory / CONFIG_NAME).exists() and any(directory.iterdir()):
            raise OrthodiffError(f"{directory}: exists and is not a pipeline directory; choose a new folder")
        with atomic_directory(directory) as staging:
            for plane, denoiser in self.denoisers.items():
                denoiser.save_pretrained(staging / "denoisers" / plane)
            _save_module(self.classifier, staging / CLASSIFIER_WEIGHTS, save_file, labels=self.labels)
            if self.segmenter is not None:
                if self.config["segmenter"]["denoisers"] == "segment_denoisers":
                    for plane, denoiser in self.segment_denoisers.items():
                        denoiser.save_pretrained(staging / "segment_denoisers" / plane)
                _save_module(self.segmenter, staging / SEGMENTER_WEIGHTS, save_file, classes=self.classes)
            files = _file_checksums(staging)
            # checksums of the spec as it reads back from JSON (tuples, numpy numbers normalised)
            write_json(staging / CONFIG_NAME, {key: value for key, value in self.config.items() if key != "checksums"})
            config = read_json(staging / CONFIG_NAME)
            config["checksums"] = {"files": files, "spec": _spec_checksums(config)}
            write_json(staging / CONFIG_NAME, config)
        return directory

    @classmethod
    def from_pretrained(cls, directory, device="cpu") -> OrthoDiffusionPipeline:
        """Load a pipeline directory; a directory of another format version is refused in one line."""
        from ..models.denoiser import load_denoisers

        directory = Path(directory)
        config = read_pipeline_config(directory)
        verify_checksums(directory, config)
        classifier_spec = config["classifier"]
        denoisers = _read_denoisers(load_denoisers, directory / "denoisers", _denoiser_planes(config))
        classifier = build_classifier(classifier_spec, config["labels"], denoisers)
        _load_weights(classifier, directory / CLASSIFIER_WEIGHTS)
        segment_denoisers = segmenter = None
        seg_spec = config.get("segmenter")
        if seg_spec:
            if seg_spec["denoisers"] == "denoisers":
                segment_denoisers = {p: denoisers[p] for p in seg_spec["planes"]}
            else:
                segment_denoisers = _read_denoisers(load_denoisers, directory / "segment_denoisers", seg_spec["planes"])
            segmenter = build_segmenter(seg_spec, len(config["classes"]), segment_denoisers)
            _load_weights(segmenter, directory / SEGMENTER_WEIGHTS)
        return cls(config, denoisers, classifier, segment_denoisers, segmenter).to(device)

    # --------------------------------------------------------------------------- predict
    def predict_study(
        self,
        series: Mapping[str, Volume],
        study_id: str = "study",
        metadata: Mapping | None = None,
        explain: bool = True,
        segment: bool = True,
        notes: Mapping[str, str] | None = None,
        noise_key: str | None = None,
    ) -> StudyPrediction:
        """Probabilities, decisions, segmentations and Grad-CAM heat maps for one study.

        ``series``: {plane: Volume} of the planes the study has (a plane it lacks is predicted
        from the others and listed in ``planes_missing``). ``metadata`` gives age/sex/height/weight
        when the head uses EHR. ``notes`` explains planes the caller could not read.
        ``study_id`` seeds the feature noise, so a study gives the same numbers every time;
        ``noise_key``, when given, seeds it instead, so that the numbers do not depend on the name.
        """
        from ..data.prepare import field_of_view_box, to_plane_tensor

        missing = dict(notes or {})
        tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        preprocessing = self.config["preprocessing"]
        spacing, slab = preprocessing.get("slice_spacing"), preprocessing.get("slab", "crop")
        field_of_view = preprocessing.get("field_of_view_mm") or {}
        for plane in self.planes:
            if plane in missing:
                continue
            volume = series.get(plane)
            if volume is None:
                missing[plane] = f"no {plane} series in the study"
                continue
            try:
                tensors[plane] = to_plane_tensor(volume, plane, self.plane_size[plane], slice_spacing=spacing, slab=slab,
                                                 field_of_view_mm=field_of_view.get(plane))
            except ScanError as exc:
                missing[plane] = f"{plane} series unusable: {exc}"
        if not tensors:
            reasons = "; ".join(missing.values()) or "no series given"
            raise OrthodiffError(f"study {study_id}: no usable series of {', '.join(self.planes)} ({reasons})")
        images = {p: torch.from_numpy(np.ascontiguousarray(t[0]))[None].float().to(self.device) for p, t in tensors.items()}
        present = torch.tensor([[p in tensors for p in PLANES]], device=self.device)
        with exact_float32():  # the numbers ``extract`` stored for the training studies
            features = self._features(images, study_id if noise_key is None else noise_key)

        cls_spec = self.config["classifier"]
        maps = self._classifier_maps(features["classifier"])
        ehr = self.encode_ehr(metadata) if cls_spec.get("use_ehr") else None
        with torch.no_grad():
            probs = torch.sigmoid(self.classifier(maps, present, ehr).float())[0].cpu().numpy()
        thresholds = self.thresholds
        result = StudyPrediction(
            study_id=study_id,
            probabilities={label: float(probs[i]) for i, label in enumerate(self.labels)},
            thresholds=thresholds,
            decisions={label: bool(probs[i] >= thresholds[label]) for i, label in enumerate(self.labels)},
            planes_used=[p for p in PLANES if p in tensors],
            planes_missing={p: missing[p] for p in PLANES if p in missing},
            classes=self.classes,
        )
        for plane, (tensor, tensor_affine) in tensors.items():
            volume = series[plane]
            result.series[plane] = SeriesPrediction(
                plane=plane,
                source_shape=tuple(int(v) for v in np.asarray(volume.array).shape[:3]),
                source_affine=np.asarray(volume.affine, float),
                tensor_affine=tensor_affine,
                image_tensor=np.asarray(tensor[0], np.float32),
                crop_box=field_of_view_box(np.shape(volume.array), volume.affine, plane, field_of_view[plane])
                if field_of_view.get(plane) else None,
            )
        if explain:
            self._explain(result, maps, present, ehr)
        if segment and self.segmenter is not None:
            self._segment(result, features["segmenter"], present, images)
        return result

    def _features(self, images: dict, study_id: str) -> dict:
        """Denoiser features for the classifier and the segmenter; one pass when they share the
        denoisers, timestep and noise (the usual case), else one pass each."""
        from ..features.extractor import FeatureExtractor

        cls_spec, seg_spec = self.config["classifier"], self.config.get("segmenter")
        selection = classifier_selection(cls_spec)
        # {job: (denoisers, spec, {plane: (timesteps, blocks)})}; the classifier's planes may read
        # different blocks and timesteps
        jobs = {"classifier": (self.denoisers, cls_spec,
                               {p: _sampling(keys) for p, keys in selection.items()})}
        if seg_spec and self.segmenter is not None:
            seg_blocks = [seg_spec["bottleneck"], *seg_spec["skips"]]
            jobs["segmenter"] = (self.segment_denoisers, seg_spec,
                                 {p: (list(seg_spec["timesteps"]), seg_blocks) for p in seg_spec["planes"]})
        shared = "segmenter" in jobs and _same_sampling(cls_spec, seg_spec) and seg_spec["denoisers"] == "denoisers"
        if shared:
            wanted = {}
            for plane in PLANES:
                parts = [jobs[name][2][plane] for name in ("classifier", "segmenter") if plane in jobs[name][2]]
                if parts:
                    wanted[plane] = (list(dict.fromkeys(t for ts, _ in parts for t in ts)),
                                     list(dict.fromkeys(b for _, bs in parts for b in bs)))
            jobs = {"classifier": (self.denoisers, cls_spec, wanted)}
        found: dict = {}
        with torch.no_grad():
            for name, (denoisers, spec, wanted) in jobs.items():
                found[name] = {}
                for plane, image in images.items():
                    if plane not in wanted:
                        continue
                    timesteps, blocks = wanted[plane]
                    extractor = FeatureExtractor(
                        denoisers[plane], timesteps, blocks, seed=spec["seed"],
                        noise_draws=spec["noise_draws"], average_timesteps=spec["average_timesteps"],
                    )
                    # {(block, timestep spec): map}
                    found[name][plane] = {key: value.float() for key, value in extractor(image, [study_id]).items()}
        if shared:
            found["segmenter"] = found["classifier"]
        return found

    def _classifier_maps(self, found: dict) -> dict:
        """{plane: composed map} of the classifier's per-plane features; zeros for a plane the study
        lacks (the head replaces that plane by its learned missing-plane embedding)."""
        from ..features.selection import compose_found, selection_shape

        maps = {}
        for plane, keys in classifier_selection(self.config["classifier"]).items():
            if plane in found:
                maps[plane] = compose_found(found[plane], keys)
            else:
                maps[plane] = torch.zeros((1, *selection_shape(self.denoisers[plane], keys)), device=self.device)
        return maps

    def _plane_maps(self, denoisers, spec, found: dict, blocks) -> dict:
        """{plane: {block: map}} for every plane of the head; zeros for a plane the study lacks."""
        name = _timestep_name(spec)
        maps = {}
        for plane in spec["planes"]:
            if plane in found:
                maps[plane] = {b: found[plane][(b, name)] for b in blocks}
            else:
                maps[plane] = {b: torch.zeros((1, *denoisers[plane].feature_shape(b)), device=self.device) for b in blocks}
        return maps

    def _explain(self, result: StudyPrediction, maps: dict, present, ehr) -> None:
        from .gradcam import gradcam_maps, maps_to_source

        decisions = [result.decisions[label] for label in self.labels]
        for plane in result.planes_used:
            if plane not in maps or plane not in self.config["classifier"]["planes"]:
                continue
            item = result.series[plane]
            heat = gradcam_maps(self.classifier, maps, present, ehr, plane, self.plane_size[plane], decisions).numpy()
            on_source = maps_to_source(heat, item.tensor_affine, item.source_shape, item.source_affine)
            for index, label in enumerate(self.labels):
                item.heatmaps_tensor[label] = heat[index].astype(np.float32)
                item.heatmaps[label] = on_source[index]

    def _segment(self, result: StudyPrediction, found: dict, present, images: dict) -> None:
        from ..data.prepare import to_source_geometry

        spec = self.config["segmenter"]
        blocks = [spec["bottleneck"], *spec["skips"]]
        features = self._plane_maps(self.segment_denoisers, spec, found, blocks)
        features = {p: {b: maps[b] for b in blocks} for p, maps in features.items()}
        images = {p: images[p] if p in images else torch.zeros((1, 1, *self.plane_size[p]), device=self.device)
                  for p in spec["planes"]}
        with torch.no_grad():
            logits = self.segmenter(features, present, images)
        for plane in result.planes_used:
            if plane not in logits:
                continue
            item = result.series[plane]
            labels = logits[plane].float().argmax(1)[0].to(torch.uint8).cpu().numpy()
            item.segmentation_tensor = labels
            item.segmentation = to_source_geometry(labels, item.tensor_affine, item.source_shape, item.source_affine,
                                                   is_label=True, crop_box=item.crop_box)

    def encode_ehr(self, metadata: Mapping | None) -> torch.Tensor:
        """(1, E) EHR input of the diagnosis head, encoded as in training (``data.datasets.encode_ehr``)
        with the training patients' statistics; a value ``metadata`` lacks counts as missing."""
        from ..data.datasets import encode_ehr

        spec = self.config["classifier"]
        return encode_ehr(metadata or {}, spec["ehr_columns"], spec["ehr_stats"]).unsqueeze(0).to(self.device)


# ------------------------------------------------------------------------------- builders
def build_classifier(spec: dict, labels: list[str], denoisers: Mapping) -> torch.nn.Module:
    """The diagnosis head of ``spec`` on these denoisers' feature widths (weights not loaded)."""
    from ..heads import MultiLabelClassifier

    missing = [p for p in spec["planes"] if p not in denoisers]
    if missing:
        raise OrthodiffError(f"classifier: no denoiser for planes {missing}; the pipeline is incomplete")
    from ..features.selection import selection_shape

    channels = {p: selection_shape(denoisers[p], keys)[0] for p, keys in classifier_selection(spec).items()}
    num_ehr = 2 * len(spec.get("ehr_columns") or [])
    return MultiLabelClassifier(channels, labels, spec["pooling"], spec["fusion"], num_ehr=num_ehr,
                                use_ehr=bool(spec.get("use_ehr")), heads=int(spec.get("attention_heads", 4)),
                                readout_grid=spec.get("readout_grid") or [1, 2, 2])


def classifier_selection(spec: dict) -> dict[str, list[str]]:
    """{plane: ["block@spec", ...]} the diagnosis head reads (one block and timestep for every
    plane in pipelines saved before features were chosen per plane)."""
    if "selection" in spec:
        return {p: list(spec["selection"][p]) for p in spec["planes"]}
    return {p: [f"{spec['block']}@{_timestep_name(spec)}"] for p in spec["planes"]}


def _timestep_name(spec: dict) -> str:
    """The feature name of a single-timestep spec's timestep ('100', or '50+100' when averaged)."""
    from ..features.extractor import timestep_spec_name

    timesteps = spec["timesteps"]
    return timestep_spec_name(timesteps) if spec.get("average_timesteps") else str(int(timesteps[0]))


def _sampling(keys) -> tuple[list[int], list[str]]:
    from ..features.selection import plane_sampling

    timesteps, blocks, _ = plane_sampling(keys)
    return timesteps, blocks


def build_segmenter(spec: dict, num_classes: int, denoisers: Mapping) -> torch.nn.Module:
    from ..heads import SegmentationModel

    blocks = [spec["bottleneck"], *spec["skips"]]
    shapes = {p: {b: denoisers[p].feature_shape(b) for b in blocks} for p in spec["planes"]}
    size = {p: tuple(denoisers[p].plane_size) for p in spec["planes"]}
    return SegmentationModel(shapes, size, spec["bottleneck"], spec["skips"], num_classes,
                             pooling=spec["pooling"], width=int(spec["width"]),
                             image_channels=int(spec.get("image_channels", 0)),
                             image_stem=int(spec.get("image_stem", 0)))


def _image_channels(spec: dict, head: dict, run_dir: Path, denoisers: Mapping) -> int:
    """How many plane-tensor channels join the decoders' last block: head.json's
    ``image_channels`` when it records it, else read off the saved weights' shapes."""
    from safetensors import safe_open

    if "image_channels" in head:
        return int(head["image_channels"])
    plane = spec["planes"][0]
    built = build_segmenter({**spec, "image_channels": 0}, 2, denoisers)
    key = f"decoders.{plane}.final.0.0.weight"
    with safe_open(str(Path(run_dir) / "head.safetensors"), framework="pt") as saved:
        if key not in saved.keys():  # noqa: SIM118  safe_open has no __contains__
            return 0
        saved_inputs = int(saved.get_slice(key).get_shape()[1])
    return max(0, saved_inputs - int(built.state_dict()[key].shape[1]))


def read_pipeline_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise OrthodiffError(f"{directory}: pipeline directory not found; save one with OrthoDiffusionPipeline.save_pretrained")
    if not path.exists():
        raise OrthodiffError(f"{directory}: not an orthodiff pipeline ({CONFIG_NAME} missing); give a folder written by save_pretrained")
    config = read_format_json(path, FORMAT, "pipeline", "the pipeline is damaged, save it again")
    if config.get("version") != VERSION:
        raise OrthodiffError(
            f"{path}: pipeline format version {config.get('version')!r}, but this orthodiff reads version {VERSION}; "
            "use the orthodiff release that wrote it, or assemble it again with OrthoDiffusionPipeline.from_runs"
        )
    for key in ("labels", "thresholds", "preprocessing", "classifier"):
        if key not in config:
            raise OrthodiffError(f"{path}: field {key!r} missing; the pipeline is damaged, save it again")
    check_head_names(directory, config)
    thresholds = config["thresholds"] if isinstance(config["thresholds"], dict) else {}
    for label in config["labels"]:
        value = thresholds.get(label, {}).get("value") if isinstance(thresholds.get(label), dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            found = "missing" if label not in thresholds else f"{thresholds[label]!r} is not a probability"
            raise OrthodiffError(
                f"{path}: the threshold of label {label!r} is {found}; give thresholds.{label}.value in [0, 1] "
                f"or {EXPORT_HINT}"
            )
    return config


def verify_checksums(directory: Path, config: dict) -> None:
    """Refuse, in one line, a weight file or head spec that differs from what was exported.
    Pipelines written before checksums were recorded are read as they are."""
    recorded = config.get("checksums")
    if recorded is None:
        return
    directory = Path(directory)
    for name, digest in sorted(recorded.get("files", {}).items()):
        path = directory / name
        if not path.is_file():
            raise OrthodiffError(f"{path}: missing from the pipeline directory; copy the whole folder or {EXPORT_HINT}")
        if sha256_file(path) != digest:
            raise OrthodiffError(
                f"{path}: differs from the file exported with this pipeline (sha256 mismatch: truncated, damaged or "
                f"replaced); copy it again from the original or {EXPORT_HINT}"
            )
    found = _spec_checksums(config)
    changed = [key for key, digest in recorded.get("spec", {}).items() if found.get(key) != digest]
    if changed:
        raise OrthodiffError(
            f"{directory / CONFIG_NAME}: {', '.join(changed)} edited since export (sha256 mismatch), which would "
            f"silently change the predictions; restore the exported {CONFIG_NAME} or {EXPORT_HINT}"
        )


def _file_checksums(directory: Path) -> dict:
    """sha256 of every file of the pipeline directory but pipeline.json, by relative path."""
    return {path.relative_to(directory).as_posix(): sha256_file(path)
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != CONFIG_NAME}


def _spec_checksums(config: dict) -> dict:
    import hashlib
    import json

    return {key: hashlib.sha256(json.dumps(config.get(key), sort_keys=True, default=str).encode()).hexdigest()
            for key in SPEC_KEYS}


def _denoiser_planes(config: dict) -> list[str]:
    planes = set(config["classifier"]["planes"])
    seg = config.get("segmenter")
    if seg and seg.get("denoisers") == "denoisers":
        planes |= set(seg["planes"])
    return [p for p in PLANES if p in planes]


def _same_sampling(a: dict, b: dict) -> bool:
    """One denoiser pass serves both heads when noise and seed agree and neither averages timesteps
    (a pass at several single timesteps gives each one's maps unchanged)."""
    keys = ("average_timesteps", "noise_draws", "seed")
    return all(a.get(k) == b.get(k) for k in keys) and not a.get("average_timesteps")


def _same_weights(first: Mapping, second: Mapping) -> bool:
    """True when every plane of ``second`` has exactly the weights of ``first``'s denoiser."""
    from ..features.backbones import denoiser_fingerprint

    return all(p in first and denoiser_fingerprint(first[p]) == denoiser_fingerprint(second[p]) for p in second)


def _check_sizes(plane_size: dict, denoisers: Mapping, run_dir: Path) -> None:
    for plane, denoiser in denoisers.items():
        if plane in plane_size and list(plane_size[plane]) != list(denoiser.plane_size):
            raise OrthodiffError(
                f"{run_dir}: the {plane} segmentation denoiser works at {list(denoiser.plane_size)}, the classifier at "
                f"{plane_size[plane]}; train both at one data.plane_size"
            )


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.exists():
        raise OrthodiffError(f"{path}: weights file missing; the directory is incomplete")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001  safetensors raises its own error types on a damaged file
        raise OrthodiffError(
            f"{path}: not a readable safetensors file ({_one_line(exc)}); it is truncated or damaged, copy it again or "
            f"{EXPORT_HINT}"
        ) from None
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc).splitlines()[0])
        raise OrthodiffError(f"{path}: weights do not fit the head its JSON describes ({first}); the directory is damaged or mixed") from None
    module.eval()


def _read_denoisers(load_denoisers, folder: Path, planes) -> dict:
    """``load_denoisers`` with a damaged file (of a pipeline saved without checksums) as one line."""
    try:
        return load_denoisers(folder, planes=planes)
    except OrthodiffError:
        raise
    except Exception as exc:  # noqa: BLE001  safetensors and JSON readers raise their own types
        raise OrthodiffError(f"{folder}: a denoiser cannot be read ({_one_line(exc)}); copy it again or {EXPORT_HINT}") from None


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _save_module(module: torch.nn.Module, path: Path, save_file, **names: list) -> None:
    """The head's weights, with the names of its outputs (``labels=`` or ``classes=``) in the file's
    metadata: the weights and the names that read their outputs travel together."""
    import json

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    metadata = {"format": "pt", "orthodiff": FORMAT, **{key: json.dumps(list(value)) for key, value in names.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def check_head_names(directory: Path, config: dict) -> None:
    """Refuse, in one line, a pipeline.json whose labels (or classes) are not those its head was
    saved with: swapped or renamed names would put each probability under another label.
    Heads saved before the names were bound, and unreadable files (named later), are not checked."""
    for name, key in ((CLASSIFIER_WEIGHTS, "labels"), (SEGMENTER_WEIGHTS, "classes")):
        bound = _bound_names(Path(directory) / name, key)
        given = config.get(key)
        if bound is not None and (key == "labels" or config.get("segmenter")) and list(given or []) != bound:
            raise OrthodiffError(
                f"{Path(directory) / CONFIG_NAME}: pipeline.json {key} {list(given or [])} do not match the head's {key} "
                f"{bound} ({name}): the pipeline was edited; export it again"
            )


def _bound_names(path: Path, key: str) -> list | None:
    """The output names stored in a head file's metadata (None when absent or unreadable)."""
    import json

    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as saved:
            metadata = saved.metadata() or {}
        names = json.loads(metadata[key])
    except Exception:  # noqa: BLE001  no names recorded, or a damaged file that _load_weights names
        return None
    return [str(n) for n in names] if isinstance(names, list) else None
