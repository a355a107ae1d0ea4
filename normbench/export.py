"""``normbench export``: a trained run's network as files that need no normbench to run.

Into the output folder:

    model.pt               the state dict (CPU tensors; torch.load(path, weights_only=True))
    model.torchscript.pt   TorchScript (torch.jit.trace; torch.jit.load)
    model.pt2              a torch.export program, batch size dynamic (torch.export.load)
    config.yaml            the run's resolved config (normbench builds the network from it)
    export.json            scheme, test accuracy, versions, the input convention, and per format
                           its file, or why it could not be written

The programs are recorded on the CPU in NCHW float32, in eval mode (BN-like layers use their
running statistics), with the fused C++ kernels switched off (``native.ENABLED``): a program
holds PyTorch operators only. Layers whose speed path is a custom autograd Function record
their plain-PyTorch reference maths (normbench.norms.tracing). Every file is read back and
checked: its output on a random batch (of another size than the one recorded) against the
network's own eval-mode output (``max_abs_diff`` in export.json). A format that fails is one
line in export.json and on stderr; the other formats are still written.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from normbench.errors import UserError, first_line
from normbench.model_io import load_run_model

FORMATS = ("state_dict", "torchscript", "export")
FILES = {"state_dict": "model.pt", "torchscript": "model.torchscript.pt", "export": "model.pt2"}
RECORD_BATCH = 2  # the example batch a program is recorded with
CHECK_BATCH = 5  # the batch it is checked with: another size, so a batch size baked in shows
TOLERANCE = 1e-4  # a program's largest |difference| from the network, relative to max(1, max |output|)


def parse_formats(values: Iterable[str]) -> list[str]:
    """``--format`` values (repeatable, comma lists; ``all``) -> formats in FORMATS order."""
    picked: set[str] = set()
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if item == "all":
                picked.update(FORMATS)
            elif item in FORMATS:
                picked.add(item)
            else:
                raise UserError(f"--format: got '{item}'; allowed: {', '.join(FORMATS)}, all (or a comma list)")
    return [f for f in FORMATS if f in picked] or list(FORMATS)


@contextlib.contextmanager
def plain_pytorch():
    """The fused C++ kernels off (normbench.norms.speed.native.ENABLED), restored afterwards."""
    from normbench.norms.speed import native

    was = native.ENABLED
    native.ENABLED = False
    try:
        yield
    finally:
        native.ENABLED = was


def check_input(seed: int = 0) -> torch.Tensor:
    """A fixed random batch of standardized images, (CHECK_BATCH, 3, 32, 32)."""
    return torch.randn(CHECK_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def max_abs_diff(program: Callable, reference: torch.Tensor, x: torch.Tensor) -> float:
    """max |program(x) - reference|."""
    with torch.no_grad():
        return float((program(x) - reference).abs().max())


def state_dict_blob(model: nn.Module) -> bytes:
    """The state dict as torch.save bytes: CPU, contiguous tensors only (weights_only loads it)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def torchscript_blob(model: nn.Module) -> bytes:
    """The network traced (eval mode) and saved as TorchScript."""
    example = torch.randn(RECORD_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; checked by running it instead
        traced = torch.jit.trace(model, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def export_blob(model: nn.Module) -> bytes:
    """The network as a torch.export program with a dynamic batch dimension, saved."""
    example = torch.randn(RECORD_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        buf = io.BytesIO()
        torch.export.save(program, buf)
    return buf.getvalue()


def load_back(fmt: str, blob: bytes, fresh_model: Callable[[], nn.Module]) -> Callable:
    """The written file read back as something callable on a batch."""
    if fmt == "state_dict":
        model = fresh_model()
        model.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
        return model.eval()
    if fmt == "torchscript":
        return torch.jit.load(io.BytesIO(blob), map_location="cpu").eval()
    return torch.export.load(io.BytesIO(blob)).module()


def export_model(model: nn.Module, fresh_model: Callable[[], nn.Module], out: Path, formats: Iterable[str],
                 write: Callable[[Path, bytes], None]) -> dict:
    """Write ``model`` (a CPU network) in each format into ``out`` and check each file read back;
    {format: {"file", "bytes", "max_abs_diff"} or {"error"}}. ``fresh_model()`` builds an
    untrained twin (for the state dict's check); ``write(path, blob)`` writes a file."""
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    x = check_input()
    with torch.no_grad():
        reference = model(x)
    bound = TOLERANCE * max(1.0, float(reference.abs().max()))
    makers = {"state_dict": state_dict_blob, "torchscript": torchscript_blob, "export": export_blob}
    results: dict = {}
    for fmt in formats:
        try:
            # a state dict is checked on the network's own path (identical output expected);
            # programs are recorded and run without the C++ kernels
            with plain_pytorch() if fmt != "state_dict" else contextlib.nullcontext():
                blob = makers[fmt](model)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                    program = load_back(fmt, blob, fresh_model)
                diff = max_abs_diff(program, reference, x)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a format the network cannot take: said, the rest written
            diff, error = None, f"{type(err).__name__}: {first_line(err)}"
        else:
            error = None if diff <= bound else (f"the program read back differs from the network by {diff:.3g} "
                                                f"(allowed {bound:.3g})")
        path = Path(out) / FILES[fmt]
        if error is not None:
            path.unlink(missing_ok=True)  # not an earlier export's file beside this export's others
            results[fmt] = {"error": error}
            continue
        write(path, blob)
        results[fmt] = {"file": path.name, "bytes": len(blob), "max_abs_diff": diff}
    return results


def export_run(path, out: Path, formats: Iterable[str] = FORMATS, checkpoint: Optional[Path] = None) -> dict:
    """Export the run in folder ``path`` into ``out`` (see the module docstring); returns what
    export.json holds."""
    from normbench import __version__
    from normbench.config import dump_config
    from normbench.data import MEAN, STD
    from normbench.models import build_model
    from normbench.tracking import atomic_write, atomic_write_json, check_folder_creatable, git_commit

    formats = list(formats)
    out = Path(out).expanduser()
    check_folder_creatable(out, "--out")
    run_model = load_run_model(path, device="cpu", checkpoint=checkpoint)
    cfg = run_model.cfg
    if out.resolve() == run_model.path.resolve():
        raise UserError(f"--out: {out} is the run folder; give another folder (the export's config.yaml "
                        "would replace the run's)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out: cannot create {out}: {err.strerror}") from None
    results = export_model(run_model.model, lambda: build_model(cfg), out, formats, atomic_write)
    atomic_write(out / "config.yaml", dump_config(cfg).encode())
    summary = run_model.summary or {}
    manifest = {
        "scheme": cfg.norm.kind,
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "run_name": cfg.run_name,
        "run_id": cfg.config_hash(),
        "run_dir": str(run_model.path),
        "status": run_model.status,
        "step": run_model.step,
        "total_steps": run_model.total_steps,
        "final_weights": run_model.final_weights,
        "final_test_acc": summary.get("final_test_acc"),
        "best_test_acc": summary.get("best_test_acc"),
        "trained_git_commit": summary.get("git_commit"),
        "normbench_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "input": {"shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW (RGB)",
                  "standardize": "x = (pixel / 255 - mean) / std per channel", "mean": list(MEAN), "std": list(STD)},
        "output": {"shape": ["batch", 10], "what": "logits of the CIFAR-10 classes"},
        "mode": "eval (BN-like layers use their running statistics)",
        "formats": results,
        "config": "config.yaml",
    }
    atomic_write_json(out / "export.json", manifest)
    return manifest
