"""The S3 speech tokenizer on onnxruntime: the CPU backend of `UnitExtractor` (`--backend onnx`).

Why: on CPU, onnxruntime's GEMMs run at full speed already at one utterance's size (M = 150-2,400 rows of the
encoder's [M, 1280] x [1280, 5120]), where torch's only catch up at M ~ 2,400; CosyVoice's own extraction route
is this engine at batch 1. So on CPU we run the same net the torch path runs, exported to ONNX, several
single-threaded runs at once over length-sorted items (one session shared by `concurrency` threads: onnxruntime
releases the GIL), which keeps every core busy without padding.

Where the ONNX file comes from:
- CosyVoice's released `speech_tokenizer_v1*.onnx` given as the weights is run as it is (batch 1: nothing says
  its graph masks padding).
- Any other weights (.pt / .safetensors) are exported once, beside the weights, named by their digest
  (`speech/identity.weights_digest`): `<weights>.<digest hex>.cslm.onnx`; where that folder is read-only, and for
  random-init nets (keyed by a digest of their tensors), into `cache_dir` (default `$CSLM_CACHE_DIR` or
  `~/.cache/megatron_cslm/s3_onnx`). Exports are written under a temporary name and renamed, so ranks that export
  at once never read a partial file.

Invariants:
- Units equal the torch path's item by item (fp32 both; tests/test_speech_units.py checks it): the export is the
  torch net's own encoder + quantizer, with s3tokenizer's padding mask (whose length is a Python int from
  `.item()`, which tracing would freeze) replaced during the export by a mask derived from the same lengths.
- The extractor's windowing of long audio, its label and its unit counts are the torch extractor's: only the
  forward pass changes, so a run may resume with the other backend.
- Each run sees one item, or a few of nearly equal length (`max_batch`), never a long padded batch.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.util
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import atomic_path
from megatron_cslm.speech.extract import UnitExtractor
from megatron_cslm.speech.identity import weights_digest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
EXPORT_MARK = "cslm_s3_export"  # metadata key of our exports: batched inputs with a padding mask
_EXPORT_LOCK = threading.Lock()  # the export patches a module attribute of s3tokenizer for its duration


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def exportable(model: str, weights: str | os.PathLike | None) -> bool:
    """v1 nets export; v2 nets (complex rotary embeddings, which the ONNX exporter refuses) run on onnxruntime
    only from a released .onnx file."""
    return "v2" not in model or (weights is not None and str(weights).endswith(".onnx"))


def resolve_backend(backend: str, device: str | torch.device, random_init: bool = False,
                    model: str = "speech_tokenizer_v1", weights: str | os.PathLike | None = None) -> str:
    """"auto" -> "onnx" on CPU when onnxruntime is installed, real weights are given and the net can run there
    (`exportable`), else "torch" (a random-init net would be exported afresh for a debugging run); "onnx" where
    it cannot run is refused."""
    if backend not in BACKENDS:
        raise CslmError(None, None, "backend", f"{backend!r}: choose from {BACKENDS}", kind="usage")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        usable = on_cpu and not random_init and exportable(model, weights)
        return "onnx" if usable and onnxruntime_available() else "torch"
    if backend == "onnx" and not exportable(model, weights):
        raise CslmError(None, None, "backend", f"onnx: {model} does not export to ONNX (complex rotary "
                        "embeddings); give its released .onnx as --tokenizer-weights, or use --backend torch",
                        kind="usage")
    if backend == "onnx":
        if not on_cpu:
            raise CslmError(None, None, "backend", f"onnx runs on CPU; on {device} use --backend torch", kind="usage")
        if not onnxruntime_available():
            raise CslmError(None, None, "backend", "onnx needs onnxruntime (pip install onnxruntime)", kind="usage")
    return backend


class _EncoderQuantizer(torch.nn.Module):
    """mel [B, 128, T], lengths [B] -> units [B, U], unit lengths [B]: the S3 net's short-audio forward."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, code_len = self.net.encoder(mel, mel_len)
        return self.net.quantizer.encode(hidden), code_len


def _traceable_non_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """s3tokenizer's `make_non_pad_mask` without `.item()`: the width is the lengths' max, which is the padded
    width because OnnxS3Net pads every run to its longest row only."""
    return torch.arange(lengths.max(), device=lengths.device)[None, :] < lengths[:, None]


def export_s3_onnx(net: torch.nn.Module, path: str | os.PathLike, digest: str = "") -> Path:
    """Export an S3Tokenizer net (encoder + quantizer, dynamic batch and length) to `path`, atomically."""
    import onnx
    import s3tokenizer.model as s3_v1

    path = Path(path)
    mel, lengths = torch.randn(2, 128, 200), torch.tensor([200, 160])
    with _EXPORT_LOCK, atomic_path(path) as tmp:
        with contextlib.ExitStack() as patches:
            patches.callback(setattr, s3_v1, "make_non_pad_mask", s3_v1.make_non_pad_mask)  # restored on exit
            s3_v1.make_non_pad_mask = _traceable_non_pad_mask
            torch.onnx.export(_EncoderQuantizer(net.cpu()).eval(), (mel, lengths), str(tmp),
                              input_names=["feats", "feats_length"], output_names=["indices", "indices_length"],
                              dynamic_axes={"feats": {0: "batch", 2: "frames"}, "feats_length": {0: "batch"},
                                            "indices": {0: "batch", 1: "units"}, "indices_length": {0: "batch"}},
                              opset_version=17, dynamo=False)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {EXPORT_MARK: "1", "weights": digest})
        onnx.save(model, str(tmp))
    log.info("exported the S3 net to %s", path)
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("CSLM_CACHE_DIR") or Path.home() / ".cache" / "megatron_cslm") / "s3_onnx"


def state_digest(net: torch.nn.Module) -> str:
    """``sha256:<16 hex>`` of a net's tensors (names, shapes, bytes): the cache key of weights with no file."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _writable_dir(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def onnx_model_for(extractor: UnitExtractor, weights: str | os.PathLike | None,
                   cache_dir: str | os.PathLike | None = None) -> Path:
    """The ONNX file that computes `extractor`'s units: CosyVoice's .onnx as given, else a cached export."""
    if weights is not None and str(weights).endswith(".onnx"):
        return Path(weights)
    if weights is not None:
        weights = Path(weights)
        digest = weights_digest(weights)
        folder = weights.parent if _writable_dir(weights.parent) else Path(cache_dir or default_cache_dir())
        path = folder / f"{weights.name}.{digest.split(':')[1]}.cslm.onnx"
    else:
        digest = state_digest(extractor.net)
        path = Path(cache_dir or default_cache_dir()) / f"{extractor.name}.random-init.{digest.split(':')[1]}.onnx"
    if not path.exists():
        export_s3_onnx(extractor.net, path, digest)
    return path


def session_options(threads: int = 1, spinning: bool = False):
    """Settings for several tokenizer processes per node: `threads` intra-op threads, one inter-op thread,
    sequential execution, no spinning (idle threads would take cores from the other processes), and no memory
    pattern (lengths change every run; the arena still reuses buffers)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


class OnnxS3Net:
    """`quantize(mel, lengths)` of an S3Tokenizer on onnxruntime: what `UnitExtractor.__call__` calls.

    The rows of a call are cut back to their own lengths and run in groups of at most `max_batch` (rows are
    length-sorted, so a group pads little) on `concurrency` threads sharing one session of `threads` intra-op
    threads each.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, concurrency: int = 1, max_batch: int = 1):
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.feats_name, self.length_name = inputs[0].name, inputs[1].name
        self.length_dtype = np.int32 if "int32" in inputs[1].type else np.int64
        ours = self.session.get_modelmeta().custom_metadata_map.get(EXPORT_MARK) == "1"
        self.max_batch = max_batch if ours else 1  # another exporter's graph may not mask padding
        self.pool = concurrent.futures.ThreadPoolExecutor(concurrency) if concurrency > 1 else None

    def _run(self, mel: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        out = self.session.run(None, {self.feats_name: mel, self.length_name: lengths.astype(self.length_dtype)})
        units = out[0].reshape(mel.shape[0], -1)
        unit_lens = out[1] if len(out) > 1 else [units.shape[1]] * mel.shape[0]
        return [units[i, :int(n)] for i, n in enumerate(unit_lens)]

    def quantize(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mel_np, lens = mel.float().cpu().numpy(), lengths.cpu().numpy()
        groups = [range(i, min(i + self.max_batch, len(lens))) for i in range(0, len(lens), self.max_batch)]

        def run(rows: range) -> list[np.ndarray]:
            longest = int(lens[rows].max())
            return self._run(np.ascontiguousarray(mel_np[rows.start:rows.stop, :, :longest]), lens[rows])

        # Longest first (LPT): the last runs to finish are the short ones, so threads idle least at the end.
        order = sorted(range(len(groups)), key=lambda g: -int(lens[groups[g]].max()))
        ordered = [groups[g] for g in order]
        ran = dict(zip(order, self.pool.map(run, ordered) if self.pool else map(run, ordered)))
        units = [u for g in range(len(groups)) for u in ran[g]]
        unit_lens = torch.tensor([u.size for u in units])
        codes = torch.zeros(len(units), int(unit_lens.max()) if units else 0, dtype=torch.long)
        for row, u in enumerate(units):
            codes[row, :u.size] = torch.from_numpy(u.astype(np.int64))
        return codes, unit_lens


class OnnxUnitExtractor(UnitExtractor):
    """A `UnitExtractor` whose forward pass runs on onnxruntime (CPU); windows, unit counts and label are those of
    the torch extractor it is made from (`from_torch`), so its units and records are interchangeable."""

    backend = "onnx"

    def __init__(self, *args, **kwargs):
        raise TypeError("build it with OnnxUnitExtractor.from_torch(extractor, ...) or build_extractor(...)")

    @classmethod
    def from_torch(cls, extractor: UnitExtractor, weights: str | os.PathLike | None = None,
                   onnx_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   threads: int = 1, concurrency: int | None = None, max_batch: int = 1) -> "OnnxUnitExtractor":
        """`extractor` (on CPU, fp32) with its net on onnxruntime.

        weights: the file `extractor` was loaded from (None for random-init), which picks the ONNX file (see the
            module docstring); onnx_path: run this file instead. threads: intra-op threads per run (1);
            concurrency: runs at once (default: torch's thread count, i.e. OMP_NUM_THREADS: the cores torch would
            use); max_batch: items per run (1: onnxruntime's GEMMs gain nothing from larger M on CPU).
        """
        if extractor.device.type != "cpu" or extractor.autocast_dtype is not None:
            raise ValueError("the onnx backend runs fp32 on CPU")
        self = cls.__new__(cls)
        self.__dict__.update(vars(extractor))
        self.onnx_path = Path(onnx_path) if onnx_path else onnx_model_for(extractor, weights, cache_dir)
        self.net = OnnxS3Net(self.onnx_path, threads, concurrency or torch.get_num_threads(), max_batch)
        return self

    def _batches(self, sorted_lengths: list[int]):
        """Rows run unpadded (OnnxS3Net), so a call bounds only its frames, not their spread: a large call keeps
        all `concurrency` threads busy."""
        batch: list[int] = []
        for pos, length in enumerate(sorted_lengths):
            if batch and length * (len(batch) + 1) > self.batch_frames:
                yield batch
                batch = []
            batch.append(pos)
        if batch:
            yield batch


def build_extractor(backend: str, model: str, weights: str | os.PathLike | None = None, random_init: bool = False,
                    device: str | torch.device = "cpu", onnx_options: dict | None = None,
                    **options) -> UnitExtractor:
    """The extractor for `--backend auto|torch|onnx` (see `resolve_backend`); `options` go to UnitExtractor,
    `onnx_options` to `OnnxUnitExtractor.from_torch`."""
    extractor = UnitExtractor(model, weights, random_init, device=device, **options)
    if resolve_backend(backend, device, random_init, model, weights) != "onnx":
        return extractor
    log.info("speech tokenizer backend: onnxruntime (CPU)")
    return OnnxUnitExtractor.from_torch(extractor, weights, **(onnx_options or {}))
