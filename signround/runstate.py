"""Crash-safe run state: what a run needs to continue after it was killed.

After every block the pipeline persists, in a run folder beside the output (``<output>.signround-run``):

* ``run.json``: a fingerprint of everything that decides the result (model, scheme, rules, tuning and
  calibration settings, calibration tokens), the number of finished blocks and their reports;
* ``block_NNNN.safetensors``: the packed layers of each finished block (metadata: each layer's scheme);
* ``inputs.safetensors``: the float and the quantized inputs of the next block;
* ``tokens.safetensors``: the calibration tokens.

Every file is written to a temporary name and renamed, and ``run.json`` is renamed last, so a kill at any
moment leaves either the previous consistent state or the new one. Block tuning is seeded per block, so a
resumed run produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from signround.act.hadamard import carry_online
from signround.config import QuantScheme
from signround.errors import SignRoundError
from signround.pack.packed import QuantLinear

RUN_SUFFIX = ".signround-run"


def run_dir_for(output: str | Path) -> Path:
    out = Path(output).expanduser()
    return out.with_name(out.name + RUN_SUFFIX)


def fingerprint(settings: dict[str, Any], tokens: torch.Tensor) -> str:
    """A hash of the run's settings and calibration tokens; a resumed run must match it exactly."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(tokens.contiguous().numpy().tobytes())
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def refuse_unresumed(folder: Path, resume: bool) -> None:
    """Never discard saved work silently: a run folder with progress needs ``--resume`` (or deleting)."""
    if (folder / "run.json").is_file() and not resume:
        raise SignRoundError(
            f"an interrupted run of this output is saved in {folder}; pass --resume to continue it, "
            "or delete that folder to start over"
        )


class RunState:
    """Reads and writes one run folder. ``done`` is the number of finished blocks."""

    def __init__(self, folder: Path, print_: str, resume: bool) -> None:
        self.folder = folder
        self.fingerprint = print_
        self.done = 0
        self.reports: list[dict[str, Any]] = []
        meta = folder / "run.json"
        refuse_unresumed(folder, resume)
        if meta.is_file():
            state = json.loads(meta.read_text())
            if state.get("fingerprint") != print_:
                raise SignRoundError(
                    f"the interrupted run in {folder} used other settings or data; rerun with the same options, "
                    "or delete that folder to start over"
                )
            self.done = int(state["done"])
            self.reports = list(state["reports"])
        else:
            if folder.exists():
                shutil.rmtree(folder)  # a folder without run.json never finished its first block
            folder.mkdir(parents=True)

    @staticmethod
    def saved_tokens(folder: Path) -> torch.Tensor | None:
        path = folder / "tokens.safetensors"
        return load_file(str(path))["tokens"] if (folder / "run.json").is_file() and path.is_file() else None

    def save_tokens(self, tokens: torch.Tensor) -> None:
        _atomic_save({"tokens": tokens}, self.folder / "tokens.safetensors")

    def block_file(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.safetensors"

    @staticmethod
    def write_block(folder: Path, index: int, block: nn.Module) -> Path:
        """Write block ``index``'s tensors (packed layers' schemes in the metadata) to ``folder`` without
        touching ``run.json`` (block-parallel ranks; not resumable)."""
        schemes = {
            name: json.dumps(module.scheme.to_dict())
            for name, module in block.named_modules()
            if isinstance(module, QuantLinear)
        }
        path = folder / f"block_{index:04d}.safetensors"
        # Every tensor of the block, not only the packed layers: smoothing changes its norms, and streamed
        # (--low-memory) runs assemble the checkpoint from these files.
        _atomic_save({key: value.cpu() for key, value in block.state_dict().items()}, path, metadata=schemes)
        return path

    def save_block(
        self,
        index: int,
        block: nn.Module,
        report: dict[str, Any],
        fp_inputs: torch.Tensor | None,
        q_inputs: torch.Tensor | None,
        nested_inputs: dict[int, torch.Tensor] | None = None,
    ) -> None:
        """Persist block ``index`` (already packed) and the next block's inputs (None: runs without
        calibration data; ``nested_inputs``: those of the model served at each nested width), then mark it
        done."""
        self.write_block(self.folder, index, block)
        if q_inputs is not None:
            inputs = {"q_inputs": q_inputs.cpu()}
            if fp_inputs is not q_inputs:
                inputs["fp_inputs"] = fp_inputs.cpu()
            inputs.update({f"q_inputs_b{b}": x.cpu() for b, x in (nested_inputs or {}).items()})
            _atomic_save(inputs, self.folder / "inputs.safetensors")
        self.done = index + 1
        self.reports.append(report)
        tmp = self.folder / "run.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done, "reports": self.reports}))
        os.replace(tmp, self.folder / "run.json")

    def restore_block(self, index: int, block: nn.Module, act: Any = None) -> None:
        """Put block ``index``'s saved state into ``block``: its float linears become the packed layers and
        every tensor (norms included) takes the saved value. ``act`` is the run's activation scheme (an
        ``ActScheme`` or None). A block on the meta device (a streamed run) only gets the packed structure."""
        path = self.block_file(index)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            schemes = f.metadata() or {}
        device = next(block.parameters()).device
        for name, scheme_json in schemes.items():
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            old = getattr(parent, child)
            layer = QuantLinear(
                old.in_features,
                old.out_features,
                QuantScheme.from_dict(json.loads(scheme_json)),
                old.bias is not None,
                old.weight.dtype,
            )
            layer.set_act(act)
            carry_online(old, layer)
            setattr(parent, child, layer.to(device))
        if device.type != "meta":
            block.load_state_dict(load_file(str(path)), strict=True)

    def load_block(self, index: int, block: nn.Module) -> None:
        """Fill a block that :meth:`restore_block` left on the meta device with block ``index``'s saved
        tensors (a resumed run whose blocks are loaded on demand)."""
        block.load_state_dict(load_file(str(self.block_file(index))), strict=True, assign=True)

    def load_inputs(self, widths: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """``(fp_inputs, q_inputs, {width: inputs})`` of block ``done``: the last for the model served at each
        nested width in ``widths``.

        Raises:
            SignRoundError: the run folder lacks a nested width's inputs (an older signround wrote it).
        """
        tensors = load_file(str(self.folder / "inputs.safetensors"))
        q = tensors["q_inputs"]
        missing = [b for b in widths if f"q_inputs_b{b}" not in tensors]
        if missing:
            raise SignRoundError(
                f"the run folder {self.folder} has no inputs for the nested widths {missing} (an older signround "
                "wrote it); delete it, or run without --resume"
            )
        return tensors.get("fp_inputs", q), q, {b: tensors[f"q_inputs_b{b}"] for b in widths}

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
